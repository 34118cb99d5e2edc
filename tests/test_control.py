"""Tests for the control messages carried on stream 0 (SPEC.md section 5)."""

from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stripeproxy.core import control, wire
from stripeproxy.core.control import ControlDecoder, Fin, Message, Open, OpenFail, OpenOk, Rst
from stripeproxy.core.wire import ProtocolError

EXAMPLES: list[Message] = [
    Open(1, "example.com", 443),
    Open(2**32 - 1, "192.0.2.7", 0),
    Open(3, "2001:db8::1", 65535),
    Open(4, "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61, 80),
    OpenOk(1, "198.51.100.1", 40000),
    OpenOk(9, "::", 1),
    OpenFail(1, 5),
    OpenFail(7, 0),
    Fin(1, 0),
    Fin(2**32 - 1, 2**64 - 1),
    Rst(1, 1),
    Rst(12, 255),
]


def feed_split(decoder: ControlDecoder, data: bytes, cuts: list[int]) -> list[Message]:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    out: list[Message] = []
    for start, end in itertools.pairwise(bounds):
        out += decoder.feed(data[start:end])
    return out


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips(message: Message) -> None:
    assert ControlDecoder().feed(control.encode(message)) == [message]


@pytest.mark.parametrize("crc", [False, True], ids=["plain", "crc"])
def test_messages_round_trip_inside_data_frames(crc: bool) -> None:
    # Control messages travel as stream-0 bytes, cut into DATA frames anywhere.
    data = b"".join(control.encode(m) for m in EXAMPLES)
    wire_bytes = b"".join(
        b"".join(wire.encode_data(control.CONTROL_STREAM, offset, data[offset : offset + 7], crc))
        for offset in range(0, len(data), 7)
    )
    frames = wire.FrameDecoder(crc).feed(wire_bytes)
    assert all(isinstance(f, wire.Data) and f.stream_id == 0 for f in frames)
    decoder = ControlDecoder()
    messages: list[Message] = []
    for frame in frames:
        assert isinstance(frame, wire.Data)
        messages += decoder.feed(frame.payload)
    assert messages == EXAMPLES


def test_open_layout() -> None:
    assert control.encode(Open(1, "example.com", 443)) == bytes.fromhex(
        "01"  # OPEN
        "0013"  # body length: 4 + 1 + 1 + 11 + 2
        "00000001"  # stream id
        "03"  # ATYP domain
        "0b"
    ) + b"example.com" + bytes.fromhex("01bb")
    assert control.encode(OpenOk(2, "10.0.0.1", 8080)) == bytes.fromhex(
        "02000b00000002010a0000011f90"
    )


def test_fin_rst_open_fail_layouts() -> None:
    assert control.encode(Fin(7, 256)) == bytes.fromhex("04000c000000070000000000000100")
    assert control.encode(Rst(7, 5)) == bytes.fromhex("0500050000000705")
    assert control.encode(OpenFail(7, 4)) == bytes.fromhex("0300050000000704")


def test_partial_message_waits_for_the_rest() -> None:
    data = control.encode(Fin(3, 99))
    decoder = ControlDecoder()
    assert decoder.feed(data[:2]) == []
    assert decoder.feed(data[2:-1]) == []
    assert decoder.feed(data[-1:] + data[:1]) == [Fin(3, 99)]


def test_too_long_message_is_refused_from_its_header() -> None:
    with pytest.raises(ProtocolError, match="too long"):
        ControlDecoder().feed(struct.pack(">BH", control.M_OPEN, control.MAX_MESSAGE + 1))


def msg(mtype: int, body: bytes) -> bytes:
    return struct.pack(">BH", mtype, len(body)) + body


MALFORMED = [
    pytest.param(msg(0x09, b""), "unknown control message 0x09", id="unknown-type"),
    pytest.param(msg(0x00, b"\x00" * 5), "unknown control message 0x00", id="type-zero"),
    pytest.param(msg(control.M_OPEN, b"\x00\x00\x01"), "short OPEN", id="open-short"),
    pytest.param(msg(control.M_OPEN, b"\x00\x00\x00\x01"), "bad address", id="open-no-address"),
    pytest.param(
        msg(control.M_OPEN, b"\x00\x00\x00\x01\x01\x7f\x00\x00"), "bad address", id="open-cut"
    ),
    pytest.param(
        msg(control.M_OPEN, b"\x00\x00\x00\x01\x01\x7f\x00\x00\x01\x00\x50\xff"),
        "bad address",
        id="open-trailing-byte",
    ),
    pytest.param(
        msg(control.M_OPEN, b"\x00\x00\x00\x01\x09\x00\x50"), "bad address", id="open-atyp"
    ),
    pytest.param(
        msg(control.M_OPEN_OK, b"\x00\x00\x00\x01\x03\x00\x00\x50"),
        "bad address",
        id="open-ok-empty-name",
    ),
    pytest.param(
        msg(control.M_OPEN, b"\x00\x00\x00\x01\x03\x02\xc3\xa9\x00\x50"),
        "bad address",
        id="open-non-ascii-name",
    ),
    pytest.param(msg(control.M_OPEN_FAIL, b"\x00" * 4), "OPEN_FAIL/RST length", id="fail-short"),
    pytest.param(msg(control.M_RST, b"\x00" * 6), "OPEN_FAIL/RST length", id="rst-long"),
    pytest.param(msg(control.M_FIN, b"\x00" * 11), "FIN length", id="fin-short"),
]


@pytest.mark.parametrize(("data", "message"), MALFORMED)
def test_malformed_messages_are_protocol_errors(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        ControlDecoder().feed(data)


# ------------------------------------------------------------------ properties

u32 = st.integers(0, 2**32 - 1)
port = st.integers(0, 65535)
label = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
hosts = st.one_of(
    st.lists(label, min_size=1, max_size=5).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: str(ipaddress.IPv6Address(int(a)))),
)
messages = st.one_of(
    st.builds(Open, u32, hosts, port),
    st.builds(OpenOk, u32, hosts, port),
    st.builds(OpenFail, u32, st.integers(0, 255)),
    st.builds(Fin, u32, st.integers(0, 2**64 - 1)),
    st.builds(Rst, u32, st.integers(0, 255)),
)
cuts = st.lists(st.integers(0, 1 << 16), max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, max_size=12), cuts)
def test_valid_messages_round_trip_in_any_split(sent: list[Message], cut_points: list[int]) -> None:
    data = b"".join(control.encode(m) for m in sent)
    assert feed_split(ControlDecoder(), data, cut_points) == sent


def decode_or_error(data: bytes, cut_points: list[int]) -> None:
    """Any bytes give messages or a ProtocolError, and how they were split
    on the way in changes neither: the decoder's buffering is invisible."""

    def outcome(cuts: list[int]) -> list[Message] | str:
        try:
            return feed_split(ControlDecoder(), data, cuts)
        except ProtocolError:
            return "ProtocolError"

    whole = outcome([])
    assert outcome(cut_points) == whole
    if whole != "ProtocolError":
        assert all(isinstance(m, Message) for m in whole)
        # A byte at a time too: every message boundary found the same way.
        assert outcome(list(range(1, len(data)))) == whole


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400), cuts)
def test_random_bytes_give_messages_or_protocol_error(data: bytes, cut_points: list[int]) -> None:
    decode_or_error(data, cut_points)


@st.composite
def near_misses(draw: st.DrawFn) -> bytes:
    """Valid messages with random bytes flipped: most headers stay plausible."""
    data = bytearray(b"".join(control.encode(m) for m in draw(st.lists(messages, max_size=6))))
    for _ in range(draw(st.integers(1, 4))):
        if data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= draw(st.integers(1, 255))
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(near_misses(), cuts)
def test_mutated_messages_give_messages_or_protocol_error(
    data: bytes, cut_points: list[int]
) -> None:
    decode_or_error(data, cut_points)
