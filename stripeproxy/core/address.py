"""SOCKS-style address codec (ATYP + address + port).

The SOCKS5 front end and the overlay wire protocol both carry destinations
in this RFC 1928 layout, so the encoding lives here, once, free of any I/O.
"""

from __future__ import annotations

import ipaddress

__all__ = [
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "AddressError",
    "decode_address",
    "encode_address",
]

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

_REPLY_GENERAL_FAILURE = 0x01
_REPLY_ADDRESS_TYPE_NOT_SUPPORTED = 0x08
_MAX_DOMAIN_LEN = 255
_MAX_PORT = 0xFFFF
_PORT_LEN = 2
# Address bytes that follow ATYP for the fixed-size types.
_FIXED_LEN = {ATYP_IPV4: 4, ATYP_IPV6: 16}


class AddressError(ValueError):
    """Malformed or unsupported address.

    Carries the SOCKS5 reply code that fits, so the front end can answer the
    client without re-classifying the error: 0x08 (address type not
    supported) or 0x01 (general failure).
    """

    def __init__(self, message: str, reply_code: int = _REPLY_GENERAL_FAILURE) -> None:
        super().__init__(message)
        self.reply_code = reply_code


def encode_address(host: str, port: int) -> bytes:
    """Encode ``host``/``port`` as ATYP + address + big-endian u16 port.

    IP literals use their packed form so the peer never has to resolve them;
    any other string is a domain name, IDNA-encoded when possible and plain
    ASCII otherwise (the idna codec rejects some names resolvers accept,
    e.g. labels longer than 63 bytes).
    """
    if not 0 <= port <= _MAX_PORT:
        raise AddressError(f"port {port} out of range 0..{_MAX_PORT}")
    port_bytes = port.to_bytes(_PORT_LEN, "big")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return bytes((ATYP_DOMAIN,)) + _encode_domain(host) + port_bytes
    if isinstance(ip, ipaddress.IPv4Address):
        return bytes((ATYP_IPV4,)) + ip.packed + port_bytes
    if ip.scope_id is not None:
        # The wire format has no room for a scope; dropping it silently
        # would send the connection out of a different interface.
        raise AddressError(f"IPv6 scope id cannot be encoded: {host!r}")
    return bytes((ATYP_IPV6,)) + ip.packed + port_bytes


def _encode_domain(host: str) -> bytes:
    """Return the length-prefixed domain, or raise AddressError."""
    try:
        name = host.encode("idna")
    except UnicodeError:
        try:
            name = host.encode("ascii")
        except UnicodeError:
            raise AddressError(f"domain name cannot be encoded: {host!r}") from None
    if not 1 <= len(name) <= _MAX_DOMAIN_LEN:
        raise AddressError(f"domain name must be 1..{_MAX_DOMAIN_LEN} bytes, got {len(name)}")
    return bytes((len(name),)) + name


def decode_address(
    buf: bytes | bytearray | memoryview, offset: int = 0
) -> tuple[str, int, int] | None:
    """Parse ATYP + address + port at ``buf[offset]``.

    Returns ``(host, port, new_offset)``, or None while ``buf`` still lacks
    part of the address, so callers can parse a stream incrementally
    without knowing the address length up front.
    """
    if offset >= len(buf):
        return None
    atyp = buf[offset]
    start = offset + 1
    if atyp == ATYP_DOMAIN:
        if start >= len(buf):
            return None
        length = buf[start]
        if length == 0:
            raise AddressError("zero-length domain name")
        start += 1
    elif atyp in _FIXED_LEN:
        length = _FIXED_LEN[atyp]
    else:
        raise AddressError(
            f"unsupported address type {atyp:#04x}", _REPLY_ADDRESS_TYPE_NOT_SUPPORTED
        )
    end = start + length
    if end + _PORT_LEN > len(buf):
        return None
    raw = bytes(buf[start:end])
    port = int.from_bytes(buf[end : end + _PORT_LEN], "big")
    if atyp == ATYP_IPV4:
        host = str(ipaddress.IPv4Address(raw))
    elif atyp == ATYP_IPV6:
        host = str(ipaddress.IPv6Address(raw))
    else:
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            raise AddressError(f"domain name is not ASCII: {raw!r}") from None
    return host, port, end + _PORT_LEN


def format_host_port(host: str, port: int) -> str:
    """``host:port`` for people, with IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
