"""Tests for the SOCKS-style address codec."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stripeproxy.core.address import (
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    AddressError,
    decode_address,
    encode_address,
)

ports = st.integers(min_value=0, max_value=0xFFFF)
_LABEL_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
domains = st.lists(st.text(_LABEL_CHARS, min_size=1, max_size=40), min_size=1, max_size=5).map(
    ".".join
)


@pytest.mark.parametrize(
    ("host", "port", "encoded"),
    [
        ("127.0.0.1", 8080, b"\x01\x7f\x00\x00\x01\x1f\x90"),
        ("0.0.0.0", 0, b"\x01\x00\x00\x00\x00\x00\x00"),
        ("255.255.255.255", 65535, b"\x01\xff\xff\xff\xff\xff\xff"),
        ("::1", 443, b"\x04" + b"\x00" * 15 + b"\x01\x01\xbb"),
        ("2001:db8::7", 65535, b"\x04\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x07\xff\xff"),
        ("example.com", 80, b"\x03\x0bexample.com\x00\x50"),
        ("a", 0, b"\x03\x01a\x00\x00"),
    ],
)
def test_encode_known_bytes(host: str, port: int, encoded: bytes) -> None:
    assert encode_address(host, port) == encoded
    assert decode_address(encoded) == (host, port, len(encoded))


def test_idna_domain_is_punycoded() -> None:
    assert encode_address("bücher.de", 80) == b"\x03\x10xn--bcher-kva.de\x00\x50"


def test_ascii_fallback_for_names_the_idna_codec_rejects() -> None:
    host = "a" * 64 + ".com"  # label > 63 bytes: idna refuses, ascii accepts
    encoded = encode_address(host, 1)
    assert encoded[:2] == bytes((ATYP_DOMAIN, len(host)))
    assert decode_address(encoded) == (host, 1, len(encoded))


def test_domain_length_limits() -> None:
    longest = ".".join(["a" * 63] * 4)[:255]
    assert len(longest) == 255
    assert decode_address(encode_address(longest, 9)) == (longest, 9, 1 + 1 + 255 + 2)
    with pytest.raises(AddressError) as info:
        encode_address(longest + "a", 9)
    assert info.value.reply_code == 0x01


@pytest.mark.parametrize("host", ["", "ü" * 64, "a\u200e.com"])
def test_unencodable_domain(host: str) -> None:
    with pytest.raises(AddressError) as info:
        encode_address(host, 80)
    assert info.value.reply_code == 0x01


@pytest.mark.parametrize("port", [-1, 65536, 1 << 20])
def test_port_out_of_range(port: int) -> None:
    with pytest.raises(AddressError):
        encode_address("127.0.0.1", port)


def test_scoped_ipv6_is_refused() -> None:
    with pytest.raises(AddressError):
        encode_address("fe80::1%eth0", 80)


def test_address_error_is_a_value_error() -> None:
    assert issubclass(AddressError, ValueError)
    assert AddressError("x").reply_code == 0x01
    assert AddressError("x", 0x08).reply_code == 0x08


def test_ipv6_decodes_to_compressed_form() -> None:
    raw = b"\x04" + ipaddress.IPv6Address("2001:0db8:0000:0000:0000:0000:0000:0001").packed
    assert decode_address(raw + b"\x00\x16") == ("2001:db8::1", 22, 19)


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0xFF])
def test_unknown_atyp(atyp: int) -> None:
    with pytest.raises(AddressError) as info:
        decode_address(bytes((atyp,)) + b"\x00" * 20)
    assert info.value.reply_code == 0x08


def test_unknown_atyp_is_reported_before_the_rest_arrives() -> None:
    with pytest.raises(AddressError) as info:
        decode_address(b"\x02")
    assert info.value.reply_code == 0x08


def test_zero_length_domain() -> None:
    with pytest.raises(AddressError) as info:
        decode_address(b"\x03\x00\x00\x50")
    assert info.value.reply_code == 0x01


def test_non_ascii_domain() -> None:
    with pytest.raises(AddressError) as info:
        decode_address(b"\x03\x02\xc3\xbc\x00\x50")
    assert info.value.reply_code == 0x01


def test_decode_at_offset_with_trailing_data() -> None:
    encoded = encode_address("10.1.2.3", 5)
    buf = b"\x05\x01\x00" + encoded + b"payload"
    assert decode_address(buf, 3) == ("10.1.2.3", 5, 3 + len(encoded))
    assert decode_address(memoryview(buf), 3) == ("10.1.2.3", 5, 3 + len(encoded))


def test_decode_at_end_of_buffer_needs_more() -> None:
    assert decode_address(b"") is None
    assert decode_address(b"\x05\x01\x00", 3) is None


@st.composite
def hosts(draw: st.DrawFn) -> tuple[str, str]:
    """A host to encode and the host decode_address is expected to return."""
    kind = draw(st.sampled_from(["v4", "v6", "domain"]))
    if kind == "domain":
        name = draw(domains)
        try:
            return name, str(ipaddress.ip_address(name))
        except ValueError:
            return name, name
    ip = draw(st.ip_addresses(v=4 if kind == "v4" else 6))
    return ip.exploded, str(ip)


@given(hosts(), ports, st.binary(max_size=8), st.binary(max_size=8))
def test_round_trip(host: tuple[str, str], port: int, prefix: bytes, suffix: bytes) -> None:
    given_host, expected_host = host
    encoded = encode_address(given_host, port)
    buf = prefix + encoded + suffix
    assert decode_address(buf, len(prefix)) == (expected_host, port, len(prefix) + len(encoded))


@given(hosts(), ports)
def test_every_strict_prefix_needs_more(host: tuple[str, str], port: int) -> None:
    encoded = b"junk" + encode_address(host[0], port)
    for end in range(4, len(encoded)):
        assert decode_address(encoded[:end], 4) is None
        assert decode_address(memoryview(encoded)[:end], 4) is None
    assert decode_address(encoded, 4) is not None


@given(st.ip_addresses(v=4), ports)
def test_ipv4_uses_atyp_1(ip: ipaddress.IPv4Address, port: int) -> None:
    assert encode_address(str(ip), port) == bytes((ATYP_IPV4,)) + ip.packed + port.to_bytes(2)


@given(st.ip_addresses(v=6), ports)
def test_ipv6_uses_atyp_4(ip: ipaddress.IPv6Address, port: int) -> None:
    assert encode_address(str(ip), port) == bytes((ATYP_IPV6,)) + ip.packed + port.to_bytes(2)


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=8))
def test_decode_never_fails_unexpectedly(buf: bytes, offset: int) -> None:
    try:
        result = decode_address(buf, offset)
    except AddressError:
        return
    if result is not None:
        assert offset < result[2] <= len(buf)
