"""Tests for the sans-I/O SOCKS5 negotiation state machine."""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stripeproxy.core.address import ATYP_DOMAIN, ATYP_IPV4, ATYP_IPV6, AddressError, encode_address
from stripeproxy.core.socks5 import (
    MAX_BUFFERED,
    REPLY_ADDRESS_TYPE_NOT_SUPPORTED,
    REPLY_COMMAND_NOT_SUPPORTED,
    REPLY_CONNECTION_REFUSED,
    REPLY_GENERAL_FAILURE,
    REPLY_HOST_UNREACHABLE,
    REPLY_SUCCEEDED,
    ConnectRequest,
    Event,
    NegotiationFailed,
    Socks5Negotiation,
    State,
    StateError,
)

NO_AUTH_GREETING = b"\x05\x01\x00"
USERPASS_GREETING = b"\x05\x01\x02"
CONNECT_LOCAL_8080 = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x1f\x90"
ZERO_BND = b"\x00\x01\x00\x00\x00\x00\x00\x00"
CREDS = (b"alice", b"s3cret")


def userpass(user: bytes, password: bytes) -> bytes:
    return bytes((1, len(user))) + user + bytes((len(password),)) + password


def failure_reply(code: int) -> bytes:
    return bytes((5, code)) + ZERO_BND


def feed(neg: Socks5Negotiation, data: bytes, cuts: list[int] | None = None) -> list[Event]:
    """Feed ``data`` split at ``cuts`` (offsets), collecting every event."""
    bounds = [0, *sorted(cuts or []), len(data)]
    events: list[Event] = []
    for start, end in itertools.pairwise(bounds):
        events += neg.receive(data[start:end])
    return events


def test_no_auth_happy_path() -> None:
    neg = Socks5Negotiation()
    states = [neg.state]
    assert neg.receive(NO_AUTH_GREETING) == []
    assert neg.data_to_send() == b"\x05\x00"
    assert neg.data_to_send() == b""
    states.append(neg.state)
    assert neg.receive(CONNECT_LOCAL_8080) == [ConnectRequest("127.0.0.1", 8080, ATYP_IPV4)]
    assert neg.data_to_send() == b""
    states.append(neg.state)
    reply = neg.reply(REPLY_SUCCEEDED, "127.0.0.1", 8080)
    assert reply == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x1f\x90"
    states.append(neg.state)
    assert states == [State.GREETING, State.REQUEST, State.AWAIT_REPLY, State.DONE]
    assert neg.unused_data == b""


def test_greeting_picks_no_auth_among_several_methods() -> None:
    neg = Socks5Negotiation()
    neg.receive(b"\x05\x03\x80\x02\x00")
    assert neg.data_to_send() == b"\x05\x00"
    assert neg.state is State.REQUEST


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (
            b"\x05\x01\x00\x03\x0bexample.com\x01\xbb",
            ConnectRequest("example.com", 443, ATYP_DOMAIN),
        ),
        (
            b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01\x00\x16",
            ConnectRequest("::1", 22, ATYP_IPV6),
        ),
        (
            b"\x05\x01\x7f\x01\x0a\x00\x00\x01\x00\x50",  # RSV is ignored
            ConnectRequest("10.0.0.1", 80, ATYP_IPV4),
        ),
    ],
)
def test_connect_address_types(request_bytes: bytes, expected: ConnectRequest) -> None:
    neg = Socks5Negotiation()
    assert neg.receive(NO_AUTH_GREETING + request_bytes) == [expected]
    assert neg.data_to_send() == b"\x05\x00"


def test_userpass_happy_path() -> None:
    neg = Socks5Negotiation(credentials=CREDS)
    assert neg.receive(USERPASS_GREETING) == []
    assert neg.data_to_send() == b"\x05\x02"
    assert neg.state is State.USERPASS
    assert neg.receive(userpass(*CREDS)) == []
    assert neg.data_to_send() == b"\x01\x00"
    assert neg.receive(CONNECT_LOCAL_8080) == [ConnectRequest("127.0.0.1", 8080, ATYP_IPV4)]


def test_userpass_empty_credentials_are_allowed() -> None:
    neg = Socks5Negotiation(credentials=(b"", b""))
    events = neg.receive(USERPASS_GREETING + b"\x01\x00\x00" + CONNECT_LOCAL_8080)
    assert events == [ConnectRequest("127.0.0.1", 8080, ATYP_IPV4)]
    assert neg.data_to_send() == b"\x05\x02\x01\x00"


@pytest.mark.parametrize(
    "creds",
    [
        (b"mallory", CREDS[1]),
        (CREDS[0], b"wrong"),
        (CREDS[0], b""),
        (b"", b""),
        (b"alic", b"s3cre"),
    ],
)
def test_userpass_wrong_credentials(creds: tuple[bytes, bytes]) -> None:
    neg = Socks5Negotiation(credentials=CREDS)
    events = neg.receive(USERPASS_GREETING + userpass(*creds) + CONNECT_LOCAL_8080)
    assert len(events) == 1
    assert isinstance(events[0], NegotiationFailed)
    assert neg.data_to_send() == b"\x05\x02\x01\x01"
    assert neg.state is State.FAILED


def test_userpass_bad_subnegotiation_version() -> None:
    neg = Socks5Negotiation(credentials=CREDS)
    events = neg.receive(USERPASS_GREETING + b"\x05" + userpass(*CREDS)[1:])
    assert len(events) == 1
    assert isinstance(events[0], NegotiationFailed)
    assert neg.data_to_send() == b"\x05\x02"


def test_no_auth_refused_when_credentials_required() -> None:
    neg = Socks5Negotiation(credentials=CREDS)
    events = neg.receive(NO_AUTH_GREETING)
    assert len(events) == 1
    assert isinstance(events[0], NegotiationFailed)
    assert neg.data_to_send() == b"\x05\xff"
    assert neg.state is State.FAILED


def test_userpass_not_selected_without_credentials() -> None:
    neg = Socks5Negotiation()
    events = neg.receive(USERPASS_GREETING)
    assert [type(e) for e in events] == [NegotiationFailed]
    assert neg.data_to_send() == b"\x05\xff"


def test_zero_methods() -> None:
    neg = Socks5Negotiation()
    events = neg.receive(b"\x05\x00")
    assert [type(e) for e in events] == [NegotiationFailed]
    assert neg.data_to_send() == b"\x05\xff"


def test_socks4_greeting_fails_without_reply() -> None:
    neg = Socks5Negotiation()
    events = neg.receive(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")
    assert [type(e) for e in events] == [NegotiationFailed]
    assert neg.data_to_send() == b""
    assert neg.state is State.FAILED


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"\x05\x02\x00\x01\x7f\x00\x00\x01\x1f\x90", REPLY_COMMAND_NOT_SUPPORTED),  # BIND
        (b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00", REPLY_COMMAND_NOT_SUPPORTED),  # UDP
        (b"\x05\x09", REPLY_COMMAND_NOT_SUPPORTED),
        (b"\x05\x01\x00\x02\x7f\x00\x00\x01\x1f\x90", REPLY_ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x05", REPLY_ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x04\x01\x00\x01\x7f\x00\x00\x01\x1f\x90", REPLY_GENERAL_FAILURE),
        (b"\x05\x01\x00\x03\x00\x00\x50", REPLY_GENERAL_FAILURE),  # empty domain
        (b"\x05\x01\x00\x03\x01\xff\x00\x50", REPLY_GENERAL_FAILURE),  # non-ASCII domain
    ],
)
def test_bad_request_gets_error_reply(request_bytes: bytes, code: int) -> None:
    neg = Socks5Negotiation()
    events = neg.receive(NO_AUTH_GREETING + request_bytes + b"trailing")
    assert [type(e) for e in events] == [NegotiationFailed]
    assert neg.data_to_send() == b"\x05\x00" + failure_reply(code)
    assert neg.state is State.FAILED
    assert neg.unused_data == b""


def test_bind_reply_byte_is_0x07() -> None:
    neg = Socks5Negotiation()
    neg.receive(NO_AUTH_GREETING + b"\x05\x02\x00\x01\x7f\x00\x00\x01\x1f\x90")
    assert neg.data_to_send()[3] == 0x07


def test_receive_after_failed_returns_nothing() -> None:
    neg = Socks5Negotiation()
    neg.receive(b"\x04")
    assert neg.receive(NO_AUTH_GREETING + CONNECT_LOCAL_8080) == []
    assert neg.data_to_send() == b""
    assert neg.unused_data == b""
    assert neg.reply(REPLY_SUCCEEDED, "127.0.0.1", 1) == b""


def test_one_byte_at_a_time_matches_all_at_once() -> None:
    stream = USERPASS_GREETING + userpass(*CREDS) + CONNECT_LOCAL_8080 + b"early"
    whole = Socks5Negotiation(credentials=CREDS)
    whole_events = whole.receive(stream)
    piecemeal = Socks5Negotiation(credentials=CREDS)
    piece_events = feed(piecemeal, stream, list(range(1, len(stream))))
    assert piece_events == whole_events == [ConnectRequest("127.0.0.1", 8080, ATYP_IPV4)]
    assert piecemeal.data_to_send() == whole.data_to_send() == b"\x05\x02\x01\x00"
    assert piecemeal.unused_data == whole.unused_data == b"early"


def test_early_data_lands_in_unused_data() -> None:
    neg = Socks5Negotiation()
    neg.receive(NO_AUTH_GREETING + CONNECT_LOCAL_8080 + b"GET / HTTP/1.1\r\n")
    neg.receive(b"Host: x\r\n")
    assert neg.unused_data == b"GET / HTTP/1.1\r\nHost: x\r\n"
    neg.reply(REPLY_SUCCEEDED, "10.0.0.2", 40000)
    assert neg.receive(b"\r\n") == []
    assert neg.unused_data == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert neg.take_unused_data() == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert neg.unused_data == b""
    neg.receive(b"more")
    assert neg.take_unused_data() == b"more"


def test_unused_data_is_empty_mid_negotiation() -> None:
    neg = Socks5Negotiation()
    neg.receive(NO_AUTH_GREETING + CONNECT_LOCAL_8080[:4])
    assert neg.unused_data == b""
    assert neg.take_unused_data() == b""
    assert neg.receive(CONNECT_LOCAL_8080[4:]) == [ConnectRequest("127.0.0.1", 8080, ATYP_IPV4)]


def test_early_data_up_to_the_limit_is_kept() -> None:
    neg = Socks5Negotiation()
    early = b"x" * MAX_BUFFERED
    assert neg.receive(NO_AUTH_GREETING + CONNECT_LOCAL_8080 + early) == [
        ConnectRequest("127.0.0.1", 8080, ATYP_IPV4)
    ]
    assert neg.unused_data == early


def test_too_much_early_data_fails() -> None:
    neg = Socks5Negotiation()
    neg.receive(NO_AUTH_GREETING + CONNECT_LOCAL_8080 + b"x" * (MAX_BUFFERED - 1))
    neg.data_to_send()
    assert neg.receive(b"yz") == [NegotiationFailed("too much data before the reply")]
    assert neg.data_to_send() == failure_reply(REPLY_GENERAL_FAILURE)
    assert neg.state is State.FAILED
    assert neg.unused_data == b""
    # The dial may still complete afterwards: there is nothing left to answer.
    assert neg.reply(REPLY_SUCCEEDED, "127.0.0.1", 8080) == b""


def test_huge_first_chunk_ends_with_one_connect_and_one_failure() -> None:
    neg = Socks5Negotiation()
    events = neg.receive(NO_AUTH_GREETING + CONNECT_LOCAL_8080 + b"x" * (MAX_BUFFERED + 1))
    assert events == [
        ConnectRequest("127.0.0.1", 8080, ATYP_IPV4),
        NegotiationFailed("too much data before the reply"),
    ]


@pytest.mark.parametrize(
    ("code", "host", "port", "expected"),
    [
        (REPLY_SUCCEEDED, "127.0.0.1", 8080, b"\x05\x00\x00\x01\x7f\x00\x00\x01\x1f\x90"),
        (REPLY_SUCCEEDED, "::1", 1, b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01\x00\x01"),
        (REPLY_SUCCEEDED, "", 0, b"\x05\x00" + ZERO_BND),
        (REPLY_CONNECTION_REFUSED, "", 0, failure_reply(REPLY_CONNECTION_REFUSED)),
        (REPLY_HOST_UNREACHABLE, "", 1234, failure_reply(REPLY_HOST_UNREACHABLE)),
        (REPLY_GENERAL_FAILURE, "10.0.0.1", 9, b"\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x09"),
    ],
)
def test_reply_bytes(code: int, host: str, port: int, expected: bytes) -> None:
    neg = Socks5Negotiation()
    neg.receive(NO_AUTH_GREETING + CONNECT_LOCAL_8080 + b"early")
    assert neg.reply(code, host, port) == expected
    if code == REPLY_SUCCEEDED:
        assert neg.state is State.DONE
        assert neg.unused_data == b"early"
    else:
        assert neg.state is State.FAILED
        assert neg.unused_data == b""
        assert neg.receive(b"more") == []


def test_reply_before_request_is_a_state_error() -> None:
    neg = Socks5Negotiation()
    with pytest.raises(StateError):
        neg.reply(REPLY_SUCCEEDED, "127.0.0.1", 1)
    assert neg.state is State.GREETING


def test_second_reply_is_a_state_error() -> None:
    neg = Socks5Negotiation()
    neg.receive(NO_AUTH_GREETING + CONNECT_LOCAL_8080)
    neg.reply(REPLY_SUCCEEDED, "127.0.0.1", 1)
    with pytest.raises(StateError):
        neg.reply(REPLY_SUCCEEDED, "127.0.0.1", 1)


def test_reply_code_must_be_a_byte() -> None:
    neg = Socks5Negotiation()
    neg.receive(NO_AUTH_GREETING + CONNECT_LOCAL_8080)
    with pytest.raises(ValueError):
        neg.reply(256)
    assert neg.state is State.AWAIT_REPLY


def test_reply_with_unencodable_bound_address_keeps_state() -> None:
    neg = Socks5Negotiation()
    neg.receive(NO_AUTH_GREETING + CONNECT_LOCAL_8080)
    with pytest.raises(AddressError):
        neg.reply(REPLY_SUCCEEDED, "127.0.0.1", 70000)
    assert neg.state is State.AWAIT_REPLY


def test_overlong_credentials_are_rejected_up_front() -> None:
    with pytest.raises(ValueError):
        Socks5Negotiation(credentials=(b"u" * 256, b"p"))


# --- property-based tests -------------------------------------------------

credentials = st.none() | st.tuples(st.binary(max_size=255), st.binary(max_size=255))


@st.composite
def split_points(draw: st.DrawFn, data: bytes) -> list[int]:
    if len(data) < 2:
        return []
    return draw(st.lists(st.integers(min_value=1, max_value=len(data) - 1), max_size=20))


def valid_prefixes(creds: tuple[bytes, bytes] | None) -> list[bytes]:
    """Well-formed openings, so random tails also exercise the later states."""
    if creds is None:
        return [b"", NO_AUTH_GREETING, NO_AUTH_GREETING + b"\x05\x01\x00"]
    return [b"", USERPASS_GREETING, USERPASS_GREETING + userpass(*creds)]


@given(credentials, st.binary(max_size=600), st.data())
def test_random_bytes_never_raise(
    creds: tuple[bytes, bytes] | None, tail: bytes, draw: st.DataObject
) -> None:
    data = draw.draw(st.sampled_from(valid_prefixes(creds))) + tail
    cuts = draw.draw(split_points(data))
    neg = Socks5Negotiation(credentials=creds)
    events = feed(neg, data, cuts)
    assert all(isinstance(e, ConnectRequest | NegotiationFailed) for e in events)
    assert len(events) <= 1
    # Segmentation must not change the outcome.
    whole = Socks5Negotiation(credentials=creds)
    assert whole.receive(data) == events
    assert whole.data_to_send() == neg.data_to_send()
    assert whole.state is neg.state
    assert whole.unused_data == neg.unused_data
    if any(isinstance(e, NegotiationFailed) for e in events):
        assert neg.state is State.FAILED
        assert neg.receive(data) == []


_LABEL_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"
domains = st.lists(st.text(_LABEL_CHARS, min_size=1, max_size=40), min_size=1, max_size=5).map(
    ".".join
)
hosts = st.ip_addresses().map(str) | domains


@given(
    hosts,
    st.integers(min_value=0, max_value=0xFFFF),
    credentials,
    st.lists(st.integers(min_value=0, max_value=0xFE), max_size=10),
    st.binary(max_size=100),
    st.data(),
)
def test_valid_negotiation_in_any_split(
    host: str,
    port: int,
    creds: tuple[bytes, bytes] | None,
    extra_methods: list[int],
    early: bytes,
    draw: st.DataObject,
) -> None:
    method = 0x00 if creds is None else 0x02
    methods = bytes([*extra_methods, method])
    stream = bytes((5, len(methods))) + methods
    expected_out = bytes((5, method))
    if creds is not None:
        stream += userpass(*creds)
        expected_out += b"\x01\x00"
    stream += b"\x05\x01\x00" + encode_address(host, port) + early
    try:
        expected_host = str(ipaddress.ip_address(host))
    except ValueError:
        expected_host = host

    neg = Socks5Negotiation(credentials=creds)
    events = feed(neg, stream, draw.draw(split_points(stream)))

    assert len(events) == 1
    event = events[0]
    assert isinstance(event, ConnectRequest)
    assert (event.host, event.port) == (expected_host, port)
    assert neg.data_to_send() == expected_out
    assert neg.unused_data == early
    assert neg.state is State.AWAIT_REPLY
