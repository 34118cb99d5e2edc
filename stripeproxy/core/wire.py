"""Subflow frame codec: pure functions over bytes, no I/O (SPEC.md section 3).

Every byte that crosses a subflow after the TCP/TLS connection is up is a
frame: a 6-byte header (type, flags, body length) and a body.  In plaintext
mode a CRC32C of header and body follows each frame, so a corrupted subflow
is noticed and dropped instead of feeding bad bytes to a stream.

The decoder is incremental and strict: anything that is not a well-formed
frame of a known type raises :class:`ProtocolError`, which the adapter turns
into a closed subflow.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import crc32c

PROTOCOL_VERSION = 1
MAGIC = b"STRP"

HEADER = struct.Struct(">BBI")
HEADER_SIZE = HEADER.size
CRC = struct.Struct(">I")
CRC_SIZE = CRC.size

# Frame types.
T_DATA = 0x01
T_ACK = 0x02
T_PING = 0x03
T_PONG = 0x04
T_GOAWAY = 0x05
T_CHALLENGE = 0x10
T_AUTH = 0x11
T_WELCOME = 0x12
T_REJECT = 0x13

NONCE_SIZE = 32
SESSION_ID_SIZE = 16
MAC_SIZE = 32
MAX_SACK_RANGES = 16
MAX_REASON = 1024

# AUTH flags.
AUTH_JOIN_ONLY = 0x01
# WELCOME flags.
WELCOME_CREATED = 0x01

# REJECT / GOAWAY codes.
REJECT_BAD_AUTH = 1
REJECT_UNKNOWN_SESSION = 2
REJECT_TOO_MANY_SUBFLOWS = 3
REJECT_TOO_MANY_SESSIONS = 4
REJECT_VERSION = 5
GOAWAY_SHUTDOWN = 1
GOAWAY_PROTOCOL_ERROR = 2

#: The session's chunk size: the largest DATA payload it sends (SPEC.md section 8),
#: one Twisted read; the frame limits below must leave room for it.
CHUNK_SIZE = 64 * 1024
DEFAULT_MAX_BODY = 256 * 1024
# Handshake frames are small; an unauthenticated peer gets no bigger buffer.
HANDSHAKE_MAX_BODY = 2048

_DATA_HEAD = struct.Struct(">IQ")
_DATA_FULL_HEAD = struct.Struct(">BBIIQ")


def data_overhead(crc: bool) -> int:
    """Wire bytes a DATA frame adds to its payload (header, stream, offset, CRC)."""
    return _DATA_FULL_HEAD.size + (CRC_SIZE if crc else 0)


_ACK_HEAD = struct.Struct(">IQQB")
_RANGE = struct.Struct(">QQ")
_U64 = struct.Struct(">Q")
_CHALLENGE = struct.Struct(f">4sB{NONCE_SIZE}s")
_AUTH = struct.Struct(f">B{NONCE_SIZE}s{SESSION_ID_SIZE}sB{MAC_SIZE}s")
_WELCOME = struct.Struct(f">B{MAC_SIZE}s")


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame; close the subflow."""


@dataclass(frozen=True, slots=True)
class Data:
    """Bytes ``[offset, offset+len(payload))`` of one stream direction."""

    stream_id: int
    offset: int
    payload: bytes
    size: int = field(default=0, compare=False, repr=False)  # wire bytes, see frame_size


@dataclass(frozen=True, slots=True)
class Ack:
    """Receiver state of one stream direction.

    ``cumulative``: every byte below it has arrived.  ``limit``: the sender may
    send bytes with offsets below it (credit).  ``ranges``: half-open
    ``(start, end)`` ranges above ``cumulative`` that have also arrived (SACK).
    """

    stream_id: int
    cumulative: int
    limit: int
    ranges: tuple[tuple[int, int], ...] = ()
    size: int = field(default=0, compare=False, repr=False)  # wire bytes, see frame_size


@dataclass(frozen=True, slots=True)
class Ping:
    token: int
    size: int = field(default=0, compare=False, repr=False)  # wire bytes, see frame_size


@dataclass(frozen=True, slots=True)
class Pong:
    token: int
    size: int = field(default=0, compare=False, repr=False)  # wire bytes, see frame_size


@dataclass(frozen=True, slots=True)
class GoAway:
    code: int
    reason: str
    size: int = field(default=0, compare=False, repr=False)  # wire bytes, see frame_size


@dataclass(frozen=True, slots=True)
class Challenge:
    version: int
    nonce: bytes
    size: int = field(default=0, compare=False, repr=False)  # wire bytes, see frame_size


@dataclass(frozen=True, slots=True)
class Auth:
    version: int
    nonce: bytes
    session_id: bytes
    flags: int
    key_id: str
    mac: bytes
    size: int = field(default=0, compare=False, repr=False)  # wire bytes, see frame_size


@dataclass(frozen=True, slots=True)
class Welcome:
    flags: int
    mac: bytes
    size: int = field(default=0, compare=False, repr=False)  # wire bytes, see frame_size


@dataclass(frozen=True, slots=True)
class Reject:
    code: int
    reason: str
    size: int = field(default=0, compare=False, repr=False)  # wire bytes, see frame_size


Frame = Data | Ack | Ping | Pong | GoAway | Challenge | Auth | Welcome | Reject

# Every frame's last field, ``size``, is the bytes it took on the wire (header,
# body and, in plaintext mode, the CRC32C trailer) as the decoder saw them; a
# frame built in memory has 0 there.  It takes no part in equality.


def frame_size(frame: Frame, crc: bool) -> int:
    """Bytes ``frame`` takes on the wire: what the decoder measured, or the
    length of its encoding for a frame built in memory."""
    if frame.size:
        return frame.size
    if isinstance(frame, Data):
        return data_overhead(crc) + len(frame.payload)
    return len(encode_frame(frame, crc))


def _frame(ftype: int, body: bytes, crc: bool) -> bytes:
    head = HEADER.pack(ftype, 0, len(body))
    if crc:
        return head + body + CRC.pack(crc32c.crc32c(body, crc32c.crc32c(head)))
    return head + body


def encode_data(stream_id: int, offset: int, payload: bytes, crc: bool) -> list[bytes]:
    """Encode a DATA frame as pieces for ``writeSequence`` (the payload is not copied)."""
    head = _DATA_FULL_HEAD.pack(T_DATA, 0, len(payload) + _DATA_HEAD.size, stream_id, offset)
    if crc:
        return [head, payload, CRC.pack(crc32c.crc32c(payload, crc32c.crc32c(head)))]
    return [head, payload]


def encode_ack(ack: Ack, crc: bool) -> bytes:
    ranges = ack.ranges[:MAX_SACK_RANGES]
    body = _ACK_HEAD.pack(ack.stream_id, ack.cumulative, ack.limit, len(ranges)) + b"".join(
        _RANGE.pack(s, e) for s, e in ranges
    )
    return _frame(T_ACK, body, crc)


def encode_ping(token: int, crc: bool) -> bytes:
    return _frame(T_PING, _U64.pack(token), crc)


def encode_pong(token: int, crc: bool) -> bytes:
    return _frame(T_PONG, _U64.pack(token), crc)


def encode_goaway(code: int, reason: str, crc: bool) -> bytes:
    return _frame(T_GOAWAY, bytes([code]) + reason.encode()[:MAX_REASON], crc)


def encode_challenge(nonce: bytes, crc: bool) -> bytes:
    return _frame(T_CHALLENGE, _CHALLENGE.pack(MAGIC, PROTOCOL_VERSION, nonce), crc)


def encode_auth(auth: Auth, crc: bool) -> bytes:
    # ASCII, as the decoder demands (SPEC.md section 2); UnicodeEncodeError is a ValueError.
    key_id = auth.key_id.encode("ascii")
    if len(key_id) > 255:
        raise ValueError("key id longer than 255 bytes")
    body = (
        _AUTH.pack(auth.version, auth.nonce, auth.session_id, auth.flags, auth.mac)
        + bytes([len(key_id)])
        + key_id
    )
    return _frame(T_AUTH, body, crc)


def encode_welcome(welcome: Welcome, crc: bool) -> bytes:
    return _frame(T_WELCOME, _WELCOME.pack(welcome.flags, welcome.mac), crc)


def encode_reject(code: int, reason: str, crc: bool) -> bytes:
    return _frame(T_REJECT, bytes([code]) + reason.encode()[:MAX_REASON], crc)


def encode_frame(frame: Frame, crc: bool) -> bytes:
    """Encode any frame (tests and tools; the data path uses the typed encoders)."""
    if isinstance(frame, Data):
        return b"".join(encode_data(frame.stream_id, frame.offset, frame.payload, crc))
    if isinstance(frame, Ack):
        return encode_ack(frame, crc)
    if isinstance(frame, Ping):
        return encode_ping(frame.token, crc)
    if isinstance(frame, Pong):
        return encode_pong(frame.token, crc)
    if isinstance(frame, GoAway):
        return encode_goaway(frame.code, frame.reason, crc)
    if isinstance(frame, Challenge):
        return _frame(T_CHALLENGE, _CHALLENGE.pack(MAGIC, frame.version, frame.nonce), crc)
    if isinstance(frame, Auth):
        return encode_auth(frame, crc)
    if isinstance(frame, Welcome):
        return encode_welcome(frame, crc)
    return encode_reject(frame.code, frame.reason, crc)


def _text(body: bytes) -> str:
    if len(body) > MAX_REASON:
        raise ProtocolError("reason text too long")
    return body.decode("utf-8", "replace")


def _decode_body(ftype: int, body: bytes, size: int = 0) -> Frame:
    """One frame from its type and body; ``size`` is its length on the wire."""
    n = len(body)
    if ftype == T_DATA:
        if n <= _DATA_HEAD.size:
            raise ProtocolError("DATA frame without payload")
        stream_id, offset = _DATA_HEAD.unpack_from(body)
        return Data(stream_id, offset, body[_DATA_HEAD.size :], size)
    if ftype == T_ACK:
        if n < _ACK_HEAD.size:
            raise ProtocolError("short ACK frame")
        stream_id, cumulative, limit, count = _ACK_HEAD.unpack_from(body)
        if count > MAX_SACK_RANGES or n != _ACK_HEAD.size + count * _RANGE.size:
            raise ProtocolError("bad ACK range count")
        ranges = tuple(
            _RANGE.unpack_from(body, _ACK_HEAD.size + i * _RANGE.size) for i in range(count)
        )
        previous = cumulative
        for start, end in ranges:
            if not previous <= start < end:
                raise ProtocolError("ACK ranges not ascending and disjoint")
            previous = end
        return Ack(stream_id, cumulative, limit, ranges, size)
    if ftype in (T_PING, T_PONG):
        if n != _U64.size:
            raise ProtocolError("bad PING/PONG length")
        (token,) = _U64.unpack(body)
        return Ping(token, size) if ftype == T_PING else Pong(token, size)
    if ftype in (T_GOAWAY, T_REJECT):
        if n < 1:
            raise ProtocolError("empty GOAWAY/REJECT")
        reason = _text(body[1:])
        return GoAway(body[0], reason, size) if ftype == T_GOAWAY else Reject(body[0], reason, size)
    if ftype == T_CHALLENGE:
        if n != _CHALLENGE.size:
            raise ProtocolError("bad CHALLENGE length")
        magic, version, nonce = _CHALLENGE.unpack(body)
        if magic != MAGIC:
            raise ProtocolError("not a stripeproxy server (bad magic)")
        return Challenge(version, nonce, size)
    if ftype == T_AUTH:
        if n < _AUTH.size + 1:
            raise ProtocolError("short AUTH frame")
        version, nonce, session_id, flags, mac = _AUTH.unpack_from(body)
        key_len = body[_AUTH.size]
        if n != _AUTH.size + 1 + key_len:
            raise ProtocolError("bad AUTH key id length")
        try:
            key_id = body[_AUTH.size + 1 :].decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("AUTH key id is not ASCII") from None
        return Auth(version, nonce, session_id, flags, key_id, mac, size)
    if ftype == T_WELCOME:
        if n != _WELCOME.size:
            raise ProtocolError("bad WELCOME length")
        flags, mac = _WELCOME.unpack(body)
        return Welcome(flags, mac, size)
    raise ProtocolError(f"unknown frame type 0x{ftype:02x}")


class FrameDecoder:
    """Incremental decoder: feed received bytes, get whole frames back.

    At most one partial frame (bounded by ``max_body``) is ever buffered, so a
    peer cannot make the decoder hold more than that.
    """

    def __init__(self, crc: bool, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.crc = crc
        self.max_body = max_body
        self._buf = bytearray()
        self._trailer = CRC_SIZE if crc else 0

    def feed(self, data: bytes, max_frames: int = 0) -> list[Frame]:
        """Buffer ``data`` and decode the complete frames (at most ``max_frames``
        if that is positive; the rest stay buffered for the next call).

        With nothing buffered (a read that starts on a frame boundary, the
        usual case) the frames are decoded from ``data`` itself and only the
        tail of a partial frame is kept: a 64 KiB read is not first copied
        into the buffer and then moved out of it.
        """
        buf = self._buf
        if buf:
            buf += data
            source: bytes | bytearray = buf
        else:
            source = data
        frames: list[Frame] = []
        pos = 0
        end = len(source)
        trailer = self._trailer
        with memoryview(source) as view:
            while end - pos >= HEADER_SIZE:
                ftype, _flags, length = HEADER.unpack_from(source, pos)
                if length > self.max_body:
                    raise ProtocolError(f"frame body of {length} bytes exceeds {self.max_body}")
                total = HEADER_SIZE + length + trailer
                if end - pos < total:
                    break
                body_start = pos + HEADER_SIZE
                body_end = body_start + length
                if trailer:
                    (expected,) = CRC.unpack_from(source, body_end)
                    if crc32c.crc32c(view[pos:body_end]) != expected:
                        raise ProtocolError("CRC32C mismatch")
                if ftype == T_DATA and length > _DATA_HEAD.size:
                    # Hot path: one copy of the payload, nothing else allocated.
                    stream_id, offset = _DATA_HEAD.unpack_from(source, body_start)
                    payload = bytes(view[body_start + _DATA_HEAD.size : body_end])
                    frames.append(Data(stream_id, offset, payload, total))
                else:
                    frames.append(_decode_body(ftype, bytes(view[body_start:body_end]), total))
                pos += total
                if len(frames) == max_frames:
                    break
            if source is not buf and pos < end:
                buf += view[pos:]  # the start of the next frame waits here
        if source is buf and pos:
            del buf[:pos]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)
