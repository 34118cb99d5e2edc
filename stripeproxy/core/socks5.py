"""Sans-I/O SOCKS5 server-side negotiation (RFC 1928, RFC 1929).

Keeping the protocol logic free of Twisted lets it be tested exhaustively
with plain bytes (including arbitrary TCP segmentation) and keeps the
transport adapter down to "feed bytes, write bytes, act on events".
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from stripeproxy.core.address import AddressError, decode_address, encode_address

__all__ = [
    "MAX_BUFFERED",
    "REPLY_ADDRESS_TYPE_NOT_SUPPORTED",
    "REPLY_COMMAND_NOT_SUPPORTED",
    "REPLY_CONNECTION_REFUSED",
    "REPLY_GENERAL_FAILURE",
    "REPLY_HOST_UNREACHABLE",
    "REPLY_NETWORK_UNREACHABLE",
    "REPLY_NOT_ALLOWED",
    "REPLY_SUCCEEDED",
    "REPLY_TTL_EXPIRED",
    "ConnectRequest",
    "Event",
    "NegotiationFailed",
    "Socks5Negotiation",
    "State",
    "StateError",
]

REPLY_SUCCEEDED: Final = 0x00
REPLY_GENERAL_FAILURE: Final = 0x01
REPLY_NOT_ALLOWED: Final = 0x02
REPLY_NETWORK_UNREACHABLE: Final = 0x03
REPLY_HOST_UNREACHABLE: Final = 0x04
REPLY_CONNECTION_REFUSED: Final = 0x05
REPLY_TTL_EXPIRED: Final = 0x06
REPLY_COMMAND_NOT_SUPPORTED: Final = 0x07
REPLY_ADDRESS_TYPE_NOT_SUPPORTED: Final = 0x08

# Negotiation messages are < 600 bytes; the rest of this budget is for data a
# client sends optimistically before we have answered its CONNECT.
MAX_BUFFERED: Final = 65536

_SOCKS_VERSION: Final = 0x05
_USERPASS_VERSION: Final = 0x01
_METHOD_NO_AUTH: Final = 0x00
_METHOD_USERPASS: Final = 0x02
_METHOD_NONE_ACCEPTABLE: Final = 0xFF
_CMD_CONNECT: Final = 0x01
_MAX_CREDENTIAL_LEN: Final = 255

_NO_ACCEPTABLE_METHODS: Final = bytes((_SOCKS_VERSION, _METHOD_NONE_ACCEPTABLE))
_AUTH_OK: Final = bytes((_USERPASS_VERSION, 0x00))
_AUTH_FAILED: Final = bytes((_USERPASS_VERSION, 0x01))


class State(enum.Enum):
    """Where the negotiation stands; the next expected message follows from it."""

    GREETING = enum.auto()  # expecting VER NMETHODS METHODS
    USERPASS = enum.auto()  # expecting the RFC 1929 VER ULEN UNAME PLEN PASSWD
    REQUEST = enum.auto()  # expecting VER CMD RSV ATYP DST.ADDR DST.PORT
    AWAIT_REPLY = enum.auto()  # CONNECT emitted; buffering early data until reply()
    DONE = enum.auto()  # success reply sent; the stream is now raw data
    FAILED = enum.auto()  # negotiation over; the connection should be closed


# The only legal moves. Anything else is a bug in the caller (reply() at the
# wrong time) and raises StateError; receive() only takes moves listed here.
_TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    State.GREETING: frozenset({State.USERPASS, State.REQUEST, State.FAILED}),
    State.USERPASS: frozenset({State.REQUEST, State.FAILED}),
    State.REQUEST: frozenset({State.AWAIT_REPLY, State.FAILED}),
    State.AWAIT_REPLY: frozenset({State.DONE, State.FAILED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
}


class StateError(RuntimeError):
    """A transition missing from the table was attempted (caller misuse)."""


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """The client asked to CONNECT; the adapter dials and then calls reply()."""

    host: str
    port: int
    atyp: int


@dataclass(frozen=True, slots=True)
class NegotiationFailed:
    """The negotiation is over: flush data_to_send(), then close. ``reason`` is for logs."""

    reason: str


Event = ConnectRequest | NegotiationFailed


def _reply_bytes(code: int, host: str, port: int) -> bytes:
    """Encode ``05 code 00 ATYP BND.ADDR BND.PORT``; no host means 0.0.0.0:0."""
    if not host:
        host, port = "0.0.0.0", 0
    return bytes((_SOCKS_VERSION, code, 0x00)) + encode_address(host, port)


class Socks5Negotiation:
    """Server side of one SOCKS5 handshake, fed with bytes in arbitrary splits.

    ``receive`` never raises: every malformed input ends in NegotiationFailed,
    so a hostile client cannot crash the adapter. Before DONE at most
    MAX_BUFFERED bytes are held.
    """

    def __init__(self, *, credentials: tuple[bytes, bytes] | None = None) -> None:
        if credentials is not None and any(len(part) > _MAX_CREDENTIAL_LEN for part in credentials):
            # RFC 1929 lengths are one byte: such credentials could never match.
            raise ValueError(f"username and password must be at most {_MAX_CREDENTIAL_LEN} bytes")
        self._credentials = credentials
        self._state = State.GREETING
        self._inbound = bytearray()
        self._outbound = bytearray()

    @property
    def state(self) -> State:
        """The current state, so the adapter can tell whether reply() is due."""
        return self._state

    @property
    def unused_data(self) -> bytes:
        """Client bytes after the CONNECT request that belong to the relayed stream."""
        if self._state in (State.AWAIT_REPLY, State.DONE):
            return bytes(self._inbound)
        return b""

    def take_unused_data(self) -> bytes:
        """Return unused_data and forget it, so the adapter forwards it only once."""
        data = self.unused_data
        if data:
            self._inbound.clear()
        return data

    def data_to_send(self) -> bytes:
        """Return (and drain) the bytes owed to the client."""
        data = bytes(self._outbound)
        self._outbound.clear()
        return data

    def receive(self, data: bytes) -> list[Event]:
        """Consume client bytes and return the events they complete."""
        if self._state is State.FAILED:
            return []
        self._inbound += data
        events: list[Event] = []
        # Every complete message moves to another state, so an unchanged
        # state means the buffer holds only part of the next message.
        while (parse := self._PARSERS.get(self._state)) is not None:
            before = self._state
            event = parse(self)
            if event is not None:
                events.append(event)
            if self._state is before:
                break
        # Partial negotiation messages are tiny, so only early data can get here.
        if self._state is State.AWAIT_REPLY and len(self._inbound) > MAX_BUFFERED:
            events.append(
                self._fail(
                    "too much data before the reply",
                    _reply_bytes(REPLY_GENERAL_FAILURE, "", 0),
                )
            )
        return events

    def reply(self, code: int, host: str = "", port: int = 0) -> bytes:
        """Return the reply to the CONNECT; success (code 0) moves to DONE, else FAILED.

        In FAILED (e.g. the client overflowed the buffer while the dial was
        in flight) there is nobody left to answer, so this returns b"".
        Misuse raises and leaves the state alone: StateError outside
        AWAIT_REPLY, ValueError/AddressError for a bad code or bound address.
        """
        if self._state is State.FAILED:
            return b""
        if not 0 <= code <= 0xFF:
            raise ValueError(f"reply code {code} is not a byte")
        target = State.DONE if code == REPLY_SUCCEEDED else State.FAILED
        self._check_transition(target)
        data = _reply_bytes(code, host, port)
        self._move(target)
        return data

    def _check_transition(self, target: State) -> None:
        if target not in _TRANSITIONS[self._state]:
            raise StateError(f"illegal transition {self._state.name} -> {target.name}")

    def _move(self, target: State) -> None:
        self._check_transition(target)
        self._state = target
        if target is State.FAILED:
            self._inbound.clear()

    def _fail(self, reason: str, reply: bytes = b"") -> NegotiationFailed:
        self._outbound += reply
        self._move(State.FAILED)
        return NegotiationFailed(reason)

    def _fail_request(self, code: int, reason: str) -> NegotiationFailed:
        return self._fail(reason, _reply_bytes(code, "", 0))

    def _parse_greeting(self) -> Event | None:
        buf = self._inbound
        if not buf:
            return None
        if buf[0] != _SOCKS_VERSION:
            # Not SOCKS5: we cannot know what framing the client expects.
            return self._fail(f"unsupported SOCKS version {buf[0]}")
        if len(buf) < 2:
            return None
        end = 2 + buf[1]
        if end == 2:
            return self._fail("client offered no authentication methods", _NO_ACCEPTABLE_METHODS)
        if len(buf) < end:
            return None
        offered = buf[2:end]
        del buf[:end]
        wanted = _METHOD_NO_AUTH if self._credentials is None else _METHOD_USERPASS
        if wanted not in offered:
            # With credentials configured, no-auth must be refused even if offered.
            return self._fail(
                f"client did not offer authentication method {wanted:#04x}",
                _NO_ACCEPTABLE_METHODS,
            )
        self._outbound += bytes((_SOCKS_VERSION, wanted))
        self._move(State.REQUEST if self._credentials is None else State.USERPASS)
        return None

    def _parse_userpass(self) -> Event | None:
        buf = self._inbound
        if not buf:
            return None
        if buf[0] != _USERPASS_VERSION:
            return self._fail(f"unsupported username/password version {buf[0]}")
        if len(buf) < 2:
            return None
        user_end = 2 + buf[1]
        if len(buf) <= user_end:
            return None
        end = user_end + 1 + buf[user_end]
        if len(buf) < end:
            return None
        username = bytes(buf[2:user_end])
        password = bytes(buf[user_end + 1 : end])
        del buf[:end]
        assert self._credentials is not None  # USERPASS is only entered with credentials
        expected_user, expected_password = self._credentials
        # Both comparisons always run so timing does not reveal which one failed.
        user_ok = hmac.compare_digest(username, expected_user)
        password_ok = hmac.compare_digest(password, expected_password)
        if not (user_ok & password_ok):
            return self._fail("username/password authentication failed", _AUTH_FAILED)
        self._outbound += _AUTH_OK
        self._move(State.REQUEST)
        return None

    def _parse_request(self) -> Event | None:
        buf = self._inbound
        if not buf:
            return None
        if buf[0] != _SOCKS_VERSION:
            return self._fail_request(
                REPLY_GENERAL_FAILURE, f"unsupported SOCKS version {buf[0]} in request"
            )
        if len(buf) < 2:
            return None
        if buf[1] != _CMD_CONNECT:
            return self._fail_request(
                REPLY_COMMAND_NOT_SUPPORTED, f"unsupported command {buf[1]:#04x}"
            )
        try:
            with memoryview(buf) as view:
                # Offset 3 skips VER CMD RSV; RSV is ignored.
                decoded = decode_address(view, 3)
        except AddressError as exc:
            return self._fail_request(exc.reply_code, f"bad destination address: {exc}")
        if decoded is None:
            return None
        host, port, end = decoded
        atyp = buf[3]
        del buf[:end]
        self._move(State.AWAIT_REPLY)
        return ConnectRequest(host, port, atyp)

    _PARSERS: Final[dict[State, Callable[[Socks5Negotiation], Event | None]]] = {
        State.GREETING: _parse_greeting,
        State.USERPASS: _parse_userpass,
        State.REQUEST: _parse_request,
    }
