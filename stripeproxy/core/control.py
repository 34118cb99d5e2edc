"""Control messages carried on stream 0 (SPEC.md section 5).

Stream lifecycle messages (OPEN, OPEN_OK, OPEN_FAIL, FIN, RST) travel inside
stream 0, an ordinary striped, acknowledged, flow-controlled byte stream.  So
they inherit reliability and ordering from the same machinery as payload,
and a dying subflow cannot lose an OPEN or a FIN.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stripeproxy.core.address import AddressError, decode_address, encode_address
from stripeproxy.core.wire import ProtocolError

CONTROL_STREAM = 0

M_OPEN = 0x01
M_OPEN_OK = 0x02
M_OPEN_FAIL = 0x03
M_FIN = 0x04
M_RST = 0x05

_HEAD = struct.Struct(">BH")
_STREAM = struct.Struct(">I")
_STREAM_CODE = struct.Struct(">IB")
_FIN = struct.Struct(">IQ")
MAX_MESSAGE = 1024


@dataclass(frozen=True, slots=True)
class Open:
    """Client asks the server to connect stream ``stream_id`` to host:port."""

    stream_id: int
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class OpenOk:
    """The target is connected; host:port is the server's local (bound) address."""

    stream_id: int
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class OpenFail:
    """The target could not be reached; ``code`` is a SOCKS5 reply code."""

    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class Fin:
    """The sender's direction of the stream ends after ``final_offset`` bytes."""

    stream_id: int
    final_offset: int


@dataclass(frozen=True, slots=True)
class Rst:
    """Abort the stream in both directions; ``code`` is a SOCKS5-style reason."""

    stream_id: int
    code: int


Message = Open | OpenOk | OpenFail | Fin | Rst


def encode(message: Message) -> bytes:
    if isinstance(message, Open | OpenOk):
        mtype = M_OPEN if isinstance(message, Open) else M_OPEN_OK
        body = _STREAM.pack(message.stream_id) + encode_address(message.host, message.port)
    elif isinstance(message, OpenFail):
        mtype, body = M_OPEN_FAIL, _STREAM_CODE.pack(message.stream_id, message.code)
    elif isinstance(message, Fin):
        mtype, body = M_FIN, _FIN.pack(message.stream_id, message.final_offset)
    else:
        mtype, body = M_RST, _STREAM_CODE.pack(message.stream_id, message.code)
    return _HEAD.pack(mtype, len(body)) + body


def _decode_one(mtype: int, body: bytes) -> Message:
    try:
        if mtype in (M_OPEN, M_OPEN_OK):
            if len(body) < _STREAM.size:
                raise ProtocolError("short OPEN message")
            (stream_id,) = _STREAM.unpack_from(body)
            parsed = decode_address(body, _STREAM.size)
            if parsed is None or parsed[2] != len(body):
                raise ProtocolError("bad address in OPEN message")
            host, port, _ = parsed
            return Open(stream_id, host, port) if mtype == M_OPEN else OpenOk(stream_id, host, port)
        if mtype in (M_OPEN_FAIL, M_RST):
            if len(body) != _STREAM_CODE.size:
                raise ProtocolError("bad OPEN_FAIL/RST length")
            stream_id, code = _STREAM_CODE.unpack(body)
            return OpenFail(stream_id, code) if mtype == M_OPEN_FAIL else Rst(stream_id, code)
        if mtype == M_FIN:
            if len(body) != _FIN.size:
                raise ProtocolError("bad FIN length")
            return Fin(*_FIN.unpack(body))
    except AddressError as e:
        raise ProtocolError(f"bad address in OPEN message: {e}") from None
    raise ProtocolError(f"unknown control message 0x{mtype:02x}")


class ControlDecoder:
    """Splits the reassembled stream-0 byte sequence into messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        buf = self._buf
        buf += data
        out: list[Message] = []
        pos = 0
        while len(buf) - pos >= _HEAD.size:
            mtype, length = _HEAD.unpack_from(buf, pos)
            if length > MAX_MESSAGE:
                raise ProtocolError("control message too long")
            end = pos + _HEAD.size + length
            if len(buf) < end:
                break
            out.append(_decode_one(mtype, bytes(buf[pos + _HEAD.size : end])))
            pos = end
        del buf[:pos]
        return out
