"""Tests for the subflow frame codec (SPEC.md section 3)."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stripeproxy.core import wire
from stripeproxy.core.wire import (
    Ack,
    Auth,
    Challenge,
    Data,
    Frame,
    FrameDecoder,
    GoAway,
    Ping,
    Pong,
    ProtocolError,
    Reject,
    Welcome,
)

U32 = 2**32 - 1
U64 = 2**64 - 1
MODES = [pytest.param(False, id="plain"), pytest.param(True, id="crc")]


def crc32c_reference(data: bytes) -> int:
    """Bitwise CRC32C (Castagnoli, reflected 0x82F63B78): slow, independent of the C package."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def encode(frame: Frame, crc: bool) -> bytes:
    """Encode any frame with the codec's own encoder for its type."""
    if isinstance(frame, Data):
        return b"".join(wire.encode_data(frame.stream_id, frame.offset, frame.payload, crc))
    if isinstance(frame, Ack):
        return wire.encode_ack(frame, crc)
    if isinstance(frame, Ping):
        return wire.encode_ping(frame.token, crc)
    if isinstance(frame, Pong):
        return wire.encode_pong(frame.token, crc)
    if isinstance(frame, GoAway):
        return wire.encode_goaway(frame.code, frame.reason, crc)
    if isinstance(frame, Challenge):
        if frame.version != wire.PROTOCOL_VERSION:  # the encoder only speaks its own
            return raw_frame(
                wire.T_CHALLENGE, wire.MAGIC + bytes([frame.version]) + frame.nonce, crc
            )
        return wire.encode_challenge(frame.nonce, crc)
    if isinstance(frame, Auth):
        return wire.encode_auth(frame, crc)
    if isinstance(frame, Welcome):
        return wire.encode_welcome(frame, crc)
    return wire.encode_reject(frame.code, frame.reason, crc)


def feed_split(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list[Frame]:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    frames: list[Frame] = []
    for start, end in itertools.pairwise(bounds):
        frames += decoder.feed(data[start:end])
    return frames


def raw_frame(ftype: int, body: bytes, crc: bool = False, flags: int = 0) -> bytes:
    head = struct.pack(">BBI", ftype, flags, len(body))
    trailer = struct.pack(">I", crc32c_reference(head + body)) if crc else b""
    return head + body + trailer


EXAMPLES: list[Frame] = [
    Data(7, 0x0102030405060708, b"hello"),
    Data(U32, U64 - 1, b"\x00"),
    Ack(5, 100, 200),
    Ack(1, 0, 1 << 40, ((0, 1), (10, 20), (30, U64))),
    Ack(2, 5, 6, tuple((100 * i, 100 * i + 50) for i in range(1, 17))),
    Ping(0),
    Ping(U64),
    Pong(1234567890),
    GoAway(wire.GOAWAY_SHUTDOWN, "bye"),
    GoAway(wire.GOAWAY_PROTOCOL_ERROR, "déjà vu ✓"),
    GoAway(0, ""),
    Challenge(wire.PROTOCOL_VERSION, bytes(range(32))),
    Auth(1, b"n" * 32, b"s" * 16, wire.AUTH_JOIN_ONLY, "key-1", b"m" * 32),
    Auth(255, b"\x00" * 32, b"\xff" * 16, 0, "", b"\x01" * 32),
    Welcome(wire.WELCOME_CREATED, b"w" * 32),
    Reject(wire.REJECT_BAD_AUTH, "authentication failed"),
]


@pytest.mark.parametrize("crc", MODES)
@pytest.mark.parametrize("frame", EXAMPLES, ids=lambda f: type(f).__name__)
def test_every_frame_type_round_trips(frame: Frame, crc: bool) -> None:
    data = encode(frame, crc)
    decoder = FrameDecoder(crc)
    assert decoder.feed(data) == [frame]
    assert decoder.buffered == 0


@pytest.mark.parametrize("crc", MODES)
def test_all_examples_in_one_byte_pieces(crc: bool) -> None:
    data = b"".join(encode(f, crc) for f in EXAMPLES)
    decoder = FrameDecoder(crc)
    frames: list[Frame] = []
    for i in range(len(data)):
        frames += decoder.feed(data[i : i + 1])
    assert frames == EXAMPLES
    assert decoder.buffered == 0


def test_crc_reference_is_castagnoli() -> None:
    # The standard check value of CRC-32C (RFC 3720 B.4).
    assert crc32c_reference(b"123456789") == 0xE3069283


def test_data_layout_plain() -> None:
    pieces = wire.encode_data(7, 0x0102030405060708, b"hi", crc=False)
    assert b"".join(pieces) == bytes.fromhex(
        "01"  # type DATA
        "00"  # flags
        "0000000e"  # body length: 4 + 8 + 2
        "00000007"  # stream id
        "0102030405060708"  # offset
        "6869"  # payload
    )
    # The payload is passed through for writeSequence, not copied.
    payload = b"x" * 100
    assert wire.encode_data(1, 0, payload, crc=False)[1] is payload


def test_data_layout_crc() -> None:
    frame = bytes.fromhex("01000000000e000000070102030405060708") + b"hi"
    data = b"".join(wire.encode_data(7, 0x0102030405060708, b"hi", crc=True))
    assert data == frame + crc32c_reference(frame).to_bytes(4, "big")


def test_ack_layout() -> None:
    ack = Ack(5, 100, 200, ((300, 400),))
    expected = bytes.fromhex(
        "02"  # type ACK
        "00"  # flags
        "00000025"  # body length: 4 + 8 + 8 + 1 + 16
        "00000005"  # stream id
        "0000000000000064"  # cumulative
        "00000000000000c8"  # limit
        "01"  # range count
        "000000000000012c"  # start
        "0000000000000190"  # end
    )
    assert wire.encode_ack(ack, crc=False) == expected
    assert wire.encode_ack(ack, crc=True) == expected + crc32c_reference(expected).to_bytes(
        4, "big"
    )


def test_ping_pong_layout() -> None:
    assert wire.encode_ping(0x0102030405060708, crc=False) == bytes.fromhex(
        "0300000000080102030405060708"
    )
    assert wire.encode_pong(1, crc=False) == bytes.fromhex("0400000000080000000000000001")


def test_ack_encoder_keeps_at_most_16_ranges() -> None:
    ranges = tuple((10 * i, 10 * i + 5) for i in range(1, 21))
    decoded = FrameDecoder(False).feed(wire.encode_ack(Ack(1, 0, 1000, ranges), False))
    assert decoded == [Ack(1, 0, 1000, ranges[: wire.MAX_SACK_RANGES])]


def test_reason_is_cut_at_max_reason() -> None:
    data = wire.encode_goaway(1, "r" * 5000, crc=False)
    assert FrameDecoder(False).feed(data) == [GoAway(1, "r" * wire.MAX_REASON)]


def test_auth_key_id_limits() -> None:
    auth = Auth(1, b"n" * 32, b"s" * 16, 0, "k" * 255, b"m" * 32)
    assert FrameDecoder(False).feed(wire.encode_auth(auth, False)) == [auth]
    with pytest.raises(ValueError):
        wire.encode_auth(Auth(1, b"n" * 32, b"s" * 16, 0, "k" * 256, b"m" * 32), False)


def test_auth_encoder_refuses_what_the_decoder_refuses() -> None:
    # Key ids are ASCII on the wire; a non-ASCII id must fail when encoding,
    # not produce a frame that the server then rejects as a protocol error.
    with pytest.raises(ValueError):
        wire.encode_auth(Auth(1, b"n" * 32, b"s" * 16, 0, "clé", b"m" * 32), False)


def test_flags_are_ignored() -> None:
    body = struct.pack(">Q", 99)
    for crc in (False, True):
        assert FrameDecoder(crc).feed(raw_frame(wire.T_PING, body, crc, flags=0xA5)) == [Ping(99)]


@pytest.mark.parametrize("where", ["header", "body", "trailer"])
def test_crc_mismatch_is_a_protocol_error(where: str) -> None:
    data = bytearray(b"".join(wire.encode_data(3, 0, b"payload", crc=True)))
    index = {"header": 6, "body": wire.HEADER_SIZE + 12, "trailer": len(data) - 1}[where]
    data[index] ^= 0x01
    with pytest.raises(ProtocolError, match="CRC32C mismatch"):
        FrameDecoder(True).feed(bytes(data))


def test_crc_mode_frames_are_not_plain_frames() -> None:
    # A CRC frame read by a plain decoder leaves 4 stray bytes: not a frame.
    data = wire.encode_ping(1, crc=True)
    decoder = FrameDecoder(False)
    assert decoder.feed(data) == [Ping(1)]
    assert decoder.buffered == wire.CRC_SIZE


@pytest.mark.parametrize("crc", MODES)
def test_oversized_frame_is_refused_from_its_header(crc: bool) -> None:
    decoder = FrameDecoder(crc, max_body=1000)
    with pytest.raises(ProtocolError, match="1001 bytes exceeds 1000"):
        decoder.feed(struct.pack(">BBI", wire.T_DATA, 0, 1001))


@pytest.mark.parametrize("crc", MODES)
def test_frame_of_exactly_max_body_is_accepted(crc: bool) -> None:
    payload = b"p" * (1000 - 12)
    decoder = FrameDecoder(crc, max_body=1000)
    assert decoder.feed(b"".join(wire.encode_data(1, 0, payload, crc))) == [Data(1, 0, payload)]


def test_default_max_body_allows_a_full_chunk_and_refuses_more() -> None:
    head = struct.pack(">BBI", wire.T_DATA, 0, wire.DEFAULT_MAX_BODY + 1)
    with pytest.raises(ProtocolError):
        FrameDecoder(False).feed(head)
    payload = b"c" * (wire.DEFAULT_MAX_BODY - 12)
    frames = FrameDecoder(False).feed(b"".join(wire.encode_data(1, 0, payload, False)))
    assert frames == [Data(1, 0, payload)]


def test_partial_frame_is_buffered_until_complete() -> None:
    data = b"".join(wire.encode_data(1, 64, b"abcdef", crc=True))
    decoder = FrameDecoder(True)
    assert decoder.feed(data[:10]) == []
    assert decoder.buffered == 10
    assert decoder.feed(data[10:] + data[:3]) == [Data(1, 64, b"abcdef")]
    assert decoder.buffered == 3


@pytest.mark.parametrize("crc", MODES)
def test_a_read_on_a_frame_boundary_keeps_only_the_partial_tail(crc: bool) -> None:
    """The common read (nothing buffered) is decoded in place; only the start
    of the next frame is kept, and a later read completes it."""
    decoder = FrameDecoder(crc)
    first = b"".join(wire.encode_data(3, 0, b"a" * 1000, crc))
    second = b"".join(wire.encode_data(3, 1000, b"b" * 1000, crc))
    data = first + wire.encode_ping(9, crc) + second
    cut = len(data) - 700
    assert decoder.feed(data[:cut]) == [Data(3, 0, b"a" * 1000), Ping(9)]
    assert decoder.buffered == len(second) - 700
    assert decoder.feed(data[cut:]) == [Data(3, 1000, b"b" * 1000)]
    assert decoder.buffered == 0


@pytest.mark.parametrize("crc", MODES)
def test_max_frames_decodes_one_at_a_time_under_the_limit_in_force(crc: bool) -> None:
    """The handshake decodes one frame, then raises the limit for the rest."""
    big = b"d" * (64 * 1024)
    data = wire.encode_ping(7, crc) + b"".join(wire.encode_data(1, 0, big, crc))
    decoder = FrameDecoder(crc, wire.HANDSHAKE_MAX_BODY)
    assert decoder.feed(data, max_frames=1) == [Ping(7)]  # the DATA is not judged yet
    decoder.max_body = wire.DEFAULT_MAX_BODY
    assert decoder.feed(b"") == [Data(1, 0, big)]
    with pytest.raises(ProtocolError):  # all at once, the DATA breaks the handshake limit
        FrameDecoder(crc, wire.HANDSHAKE_MAX_BODY).feed(data)


ACK_HEAD = struct.Struct(">IQQB")
MALFORMED = [
    pytest.param(wire.T_DATA, struct.pack(">IQ", 1, 0), "without payload", id="data-empty"),
    pytest.param(wire.T_DATA, b"\x00" * 5, "without payload", id="data-short"),
    pytest.param(wire.T_ACK, b"\x00" * 20, "short ACK", id="ack-short"),
    pytest.param(wire.T_ACK, ACK_HEAD.pack(1, 0, 0, 1), "range count", id="ack-missing-range"),
    pytest.param(
        wire.T_ACK,
        ACK_HEAD.pack(1, 0, 0, 17) + b"\x00" * 16 * 17,
        "range count",
        id="ack-17-ranges",
    ),
    pytest.param(
        wire.T_ACK,
        ACK_HEAD.pack(1, 50, 0, 1) + struct.pack(">QQ", 10, 60),
        "ascending",
        id="ack-range-below-cumulative",
    ),
    pytest.param(
        wire.T_ACK,
        ACK_HEAD.pack(1, 0, 0, 1) + struct.pack(">QQ", 10, 10),
        "ascending",
        id="ack-empty-range",
    ),
    pytest.param(
        wire.T_ACK,
        ACK_HEAD.pack(1, 0, 0, 2) + struct.pack(">QQQQ", 10, 20, 15, 30),
        "ascending",
        id="ack-overlapping-ranges",
    ),
    pytest.param(wire.T_PING, b"\x00" * 7, "PING/PONG length", id="ping-short"),
    pytest.param(wire.T_PONG, b"\x00" * 9, "PING/PONG length", id="pong-long"),
    pytest.param(wire.T_GOAWAY, b"", "empty", id="goaway-empty"),
    pytest.param(wire.T_REJECT, b"\x01" + b"r" * 1025, "too long", id="reject-long-reason"),
    pytest.param(wire.T_CHALLENGE, b"STRP\x01" + b"n" * 31, "CHALLENGE length", id="chal-short"),
    pytest.param(wire.T_CHALLENGE, b"HTTP\x01" + b"n" * 32, "bad magic", id="chal-magic"),
    pytest.param(wire.T_AUTH, b"\x01" * 82, "short AUTH", id="auth-short"),
    pytest.param(wire.T_AUTH, b"\x01" * 82 + b"\x05abc", "key id length", id="auth-keylen"),
    pytest.param(wire.T_AUTH, b"\x01" * 82 + b"\x02\xc3\xa9", "not ASCII", id="auth-key-utf8"),
    pytest.param(wire.T_WELCOME, b"\x01" * 32, "WELCOME length", id="welcome-short"),
    pytest.param(0x7F, b"", "unknown frame type 0x7f", id="unknown-type"),
]


@pytest.mark.parametrize("crc", MODES)
@pytest.mark.parametrize(("ftype", "body", "message"), MALFORMED)
def test_malformed_bodies_are_protocol_errors(
    ftype: int, body: bytes, message: str, crc: bool
) -> None:
    with pytest.raises(ProtocolError, match=message):
        FrameDecoder(crc).feed(raw_frame(ftype, body, crc))


def test_frames_before_a_bad_one_are_not_half_decoded() -> None:
    # The error is raised for the whole feed; the decoder does not hand back
    # a partial list and pretend the subflow is fine.
    data = wire.encode_ping(1, False) + raw_frame(0x7F, b"")
    with pytest.raises(ProtocolError):
        FrameDecoder(False).feed(data)


# ------------------------------------------------------------------ properties

u32 = st.integers(0, U32)
u64 = st.integers(0, U64)
u8 = st.integers(0, 255)
reason = st.text(max_size=100)


@st.composite
def acks(draw: st.DrawFn) -> Ack:
    cumulative = draw(u64)
    points = draw(st.lists(st.integers(cumulative, U64), unique=True, max_size=32))
    points.sort()
    ranges = tuple((points[i], points[i + 1]) for i in range(0, len(points) - 1, 2))
    return Ack(draw(u32), cumulative, draw(u64), ranges)


frames = st.one_of(
    st.builds(Data, u32, u64, st.binary(min_size=1, max_size=300)),
    acks(),
    st.builds(Ping, u64),
    st.builds(Pong, u64),
    st.builds(GoAway, u8, reason),
    st.builds(Challenge, st.just(wire.PROTOCOL_VERSION), st.binary(min_size=32, max_size=32)),
    st.builds(
        Auth,
        u8,
        st.binary(min_size=32, max_size=32),
        st.binary(min_size=16, max_size=16),
        u8,
        st.text(st.characters(max_codepoint=127), max_size=255),
        st.binary(min_size=32, max_size=32),
    ),
    st.builds(Welcome, u8, st.binary(min_size=32, max_size=32)),
    st.builds(Reject, u8, reason),
)
cuts = st.lists(st.integers(0, 1 << 16), max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, max_size=12), st.booleans(), cuts)
def test_valid_frames_round_trip_in_any_split(
    sent: list[Frame], crc: bool, cut_points: list[int]
) -> None:
    data = b"".join(encode(f, crc) for f in sent)
    decoder = FrameDecoder(crc)
    assert feed_split(decoder, data, cut_points) == sent
    assert decoder.buffered == 0


def decode_or_error(data: bytes, crc: bool, cut_points: list[int]) -> None:
    decoder = FrameDecoder(crc, max_body=4096)
    try:
        decoded = feed_split(decoder, data, cut_points)
    except ProtocolError:
        return
    for frame in decoded:
        assert isinstance(frame, Frame)
    # Whatever was accepted re-encodes to a frame that decodes the same.
    for frame in decoded:
        assert FrameDecoder(crc).feed(encode(frame, crc)) == [frame]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.booleans(), cuts)
def test_random_bytes_give_frames_or_protocol_error(
    data: bytes, crc: bool, cut_points: list[int]
) -> None:
    decode_or_error(data, crc, cut_points)


@st.composite
def mutated_streams(draw: st.DrawFn) -> tuple[bytes, bool]:
    """Valid frames with a few bytes flipped, cut or inserted: near misses."""
    crc = draw(st.booleans())
    data = bytearray(b"".join(encode(f, crc) for f in draw(st.lists(frames, max_size=6))))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data), crc


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(mutated_streams(), cuts)
def test_mutated_frames_give_frames_or_protocol_error(
    stream: tuple[bytes, bool], cut_points: list[int]
) -> None:
    data, crc = stream
    decode_or_error(data, crc, cut_points)


@settings(max_examples=200, deadline=None)
@given(st.lists(frames, min_size=1, max_size=12), st.booleans(), cuts)
def test_decoded_frames_report_their_wire_size(
    sent: list[Frame], crc: bool, cut_points: list[int]
) -> None:
    """One place for frame sizes: the decoder measures every frame (the CRC32C
    trailer included), and frame_size() of a frame built in memory agrees."""
    data = b"".join(encode(f, crc) for f in sent)
    received = feed_split(FrameDecoder(crc), data, cut_points)
    assert [f.size for f in received] == [len(encode(f, crc)) for f in sent]
    assert sum(f.size for f in received) == len(data)
    for frame in sent:
        assert frame.size == 0  # built in memory: not measured
        assert wire.frame_size(frame, crc) == len(encode(frame, crc))
        assert wire.encode_frame(frame, crc) == encode(frame, crc)


def test_wire_size_is_not_part_of_equality() -> None:
    (decoded,) = FrameDecoder(True).feed(wire.encode_ping(7, True))
    assert decoded == Ping(7) and decoded.size == wire.HEADER_SIZE + 8 + wire.CRC_SIZE
    assert repr(decoded) == "Ping(token=7)"
