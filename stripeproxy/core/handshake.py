"""The subflow handshake (SPEC.md section 2): proofs and both ends as sans-I/O state machines.

Both sides prove knowledge of the pre-shared key with HMAC-SHA256 over both
fresh nonces, so no secret crosses the wire and a recorded handshake cannot
be replayed on a new subflow.  Labels keep the client's and the server's
proofs from being interchangeable.

:class:`ClientHandshake` and :class:`ServerHandshake` are fed decoded frames
(and the few local inputs: start, the registry's decision, timeout, lost) and
answer with bytes to send (``data_to_send()``) and an outcome.  They never
touch a socket or a clock, so every state x input pair is tested without one
(tests/test_handshake.py); the Twisted adapters in ``net/client_subflow.py``
and ``net/server_subflow.py`` only feed them and act on the outcome.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias, TypeVar

from stripeproxy.core import wire

__all__ = [
    "REJECT_REASONS",
    "ClientHandshake",
    "ClientState",
    "Failed",
    "Input",
    "Joined",
    "Outcome",
    "Proven",
    "Rejected",
    "ServerHandshake",
    "ServerState",
    "StateError",
    "client_proof",
    "new_nonce",
    "new_session_id",
    "proofs_equal",
    "server_proof",
]

_CLIENT_LABEL = b"stripeproxy v1 client proof"
_SERVER_LABEL = b"stripeproxy v1 server proof"

REJECT_REASONS: Final[dict[int, str]] = {
    wire.REJECT_BAD_AUTH: "authentication failed",
    wire.REJECT_UNKNOWN_SESSION: "unknown session",
    wire.REJECT_TOO_MANY_SUBFLOWS: "too many subflows in this session",
    wire.REJECT_TOO_MANY_SESSIONS: "too many sessions",
    wire.REJECT_VERSION: "unsupported protocol version",
}


def new_nonce() -> bytes:
    return secrets.token_bytes(wire.NONCE_SIZE)


def new_session_id() -> bytes:
    return secrets.token_bytes(wire.SESSION_ID_SIZE)


def client_proof(
    psk: bytes, server_nonce: bytes, client_nonce: bytes, session_id: bytes, flags: int, key_id: str
) -> bytes:
    message = b"".join(
        [_CLIENT_LABEL, server_nonce, client_nonce, session_id, bytes([flags]), key_id.encode()]
    )
    return hmac.new(psk, message, hashlib.sha256).digest()


def server_proof(
    psk: bytes, server_nonce: bytes, client_nonce: bytes, session_id: bytes, flags: int
) -> bytes:
    message = b"".join([_SERVER_LABEL, server_nonce, client_nonce, session_id, bytes([flags])])
    return hmac.new(psk, message, hashlib.sha256).digest()


def proofs_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison, so timing does not leak how much of a proof matched."""
    return hmac.compare_digest(a, b)


# ------------------------------------------------------------------ outcomes


@dataclass(frozen=True, slots=True)
class Joined:
    """The handshake succeeded; ``flags`` are the WELCOME flags (CREATED or 0)."""

    flags: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """A REJECT was received (client) or sent (server); close the subflow."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Failed:
    """The handshake broke off (protocol error, bad proof, timeout, lost).

    ``reason`` is for logs and holds nothing from the network."""

    reason: str


@dataclass(frozen=True, slots=True)
class Proven:
    """Server: the AUTH proof is valid; the adapter asks the registry, then calls
    ``attached()`` or ``refused()``."""

    key_id: str
    session_id: bytes
    flags: int


Outcome: TypeAlias = Joined | Rejected | Failed | Proven


class StateError(RuntimeError):
    """A local input (start, attached, refused) at a time the table does not allow:
    a bug in the adapter, not something a peer can cause."""


# -------------------------------------------------------------------- inputs


class Input(enum.Enum):
    """Everything that can happen to a handshake."""

    START = enum.auto()  # server: admission lets the CHALLENGE go out
    CHALLENGE = enum.auto()  # a CHALLENGE frame arrived
    AUTH = enum.auto()  # an AUTH frame arrived
    WELCOME = enum.auto()  # a WELCOME frame arrived
    REJECT = enum.auto()  # a REJECT frame arrived
    OTHER_FRAME = enum.auto()  # DATA, ACK, PING, PONG or GOAWAY: only valid after the handshake
    ATTACHED = enum.auto()  # server: the registry placed the subflow in a session
    REFUSED = enum.auto()  # server: the registry refused it (a REJECT code)
    TIMEOUT = enum.auto()  # the handshake timer ran out
    LOST = enum.auto()  # the connection went away


# Inputs a peer causes; one missing from a table is a protocol error.
FRAME_INPUTS: Final = frozenset(
    {Input.CHALLENGE, Input.AUTH, Input.WELCOME, Input.REJECT, Input.OTHER_FRAME}
)


def frame_input(frame: wire.Frame) -> Input:
    """The input a decoded frame stands for."""
    if isinstance(frame, wire.Challenge):
        return Input.CHALLENGE
    if isinstance(frame, wire.Auth):
        return Input.AUTH
    if isinstance(frame, wire.Welcome):
        return Input.WELCOME
    if isinstance(frame, wire.Reject):
        return Input.REJECT
    return Input.OTHER_FRAME


class ClientState(enum.Enum):
    """Where the client end of a subflow handshake stands."""

    AWAIT_CHALLENGE = enum.auto()  # connected; the server speaks first
    AWAIT_VERDICT = enum.auto()  # AUTH sent; expecting WELCOME or REJECT
    JOINED = enum.auto()  # WELCOME with a valid server proof (terminal)
    REJECTED = enum.auto()  # the server sent REJECT (terminal)
    FAILED = enum.auto()  # protocol error, bad server proof, timeout or lost (terminal)


class ServerState(enum.Enum):
    """Where the server end of a subflow handshake stands."""

    NEW = enum.auto()  # accepted; admission may hold the CHALLENGE back
    CHALLENGED = enum.auto()  # CHALLENGE sent; expecting AUTH
    PROVEN = enum.auto()  # valid AUTH; waiting for the registry's attach decision
    JOINED = enum.auto()  # WELCOME sent (terminal)
    REJECTED = enum.auto()  # REJECT sent (terminal)
    FAILED = enum.auto()  # protocol error, timeout or lost (terminal)


_CLIENT_TERMINAL: Final = frozenset({ClientState.JOINED, ClientState.REJECTED, ClientState.FAILED})
_SERVER_TERMINAL: Final = frozenset({ServerState.JOINED, ServerState.REJECTED, ServerState.FAILED})


def _describe(inp: Input, payload: object) -> str:
    return type(payload).__name__.upper() if inp in FRAME_INPUTS else inp.name


_S = TypeVar("_S", ClientState, ServerState)
_M = TypeVar("_M")


def _transition(
    machine: _M,
    state: _S,
    inp: Input,
    payload: object,
    table: Mapping[
        tuple[_S, Input],
        tuple[Callable[[_M, object], tuple[_S, Outcome | None]], frozenset[_S]],
    ],
    failed: _S,
    expects: Mapping[_S, str],
) -> tuple[_S, Outcome | None]:
    """One step of either machine: the table's handler, or FAILED for a frame
    the table does not list (a local call out of turn is the caller's bug)."""
    entry = table.get((state, inp))
    if entry is None:
        if inp not in FRAME_INPUTS:
            raise StateError(f"{inp.name} is not allowed in state {state.name}")
        return failed, Failed(f"expected {expects[state]}, got {_describe(inp, payload)}")
    handler, allowed = entry
    target, outcome = handler(machine, payload)
    assert target in allowed, f"{state.name} -> {target.name} is not in the table"
    return target, outcome


# -------------------------------------------------------------------- client


_ClientStep: TypeAlias = tuple[ClientState, Outcome | None]


class ClientHandshake:
    """The client end: answer the CHALLENGE with a proof, check the server's proof.

    ``choose_session`` is asked at CHALLENGE time (not before: the session may
    change while the connection waits) for ``(session_id, join_only)``.
    """

    def __init__(
        self,
        psk: bytes,
        key_id: str,
        crc: bool,
        choose_session: Callable[[], tuple[bytes, bool]],
        nonce: bytes | None = None,
    ) -> None:
        self.psk = psk
        self.key_id = key_id
        self.crc = crc
        self.nonce = new_nonce() if nonce is None else nonce
        self._choose_session = choose_session
        self._state = ClientState.AWAIT_CHALLENGE
        self._out: list[bytes] = []
        self.server_nonce = b""
        self.session_id = b""
        self.flags = 0  # the AUTH flags sent

    @property
    def state(self) -> ClientState:
        return self._state

    def data_to_send(self) -> bytes:
        """Return (and drain) the bytes owed to the server."""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def receive(self, frame: wire.Frame) -> Outcome | None:
        return self._step(frame_input(frame), frame)

    def timeout(self) -> Outcome | None:
        return self._step(Input.TIMEOUT, None)

    def lost(self) -> Outcome | None:
        return self._step(Input.LOST, None)

    def _step(self, inp: Input, payload: object) -> Outcome | None:
        if self._state in _CLIENT_TERMINAL:
            return None  # late events change nothing
        self._state, outcome = _transition(
            self, self._state, inp, payload, _CLIENT_TABLE, ClientState.FAILED, _CLIENT_EXPECTS
        )
        return outcome

    def _on_challenge(self, frame: object) -> _ClientStep:
        assert isinstance(frame, wire.Challenge)
        if frame.version != wire.PROTOCOL_VERSION:
            # We cannot know what the server would accept: close without answering.
            return ClientState.FAILED, Failed(f"server speaks protocol version {frame.version}")
        self.server_nonce = frame.nonce
        self.session_id, join_only = self._choose_session()
        self.flags = wire.AUTH_JOIN_ONLY if join_only else 0
        mac = client_proof(
            self.psk, frame.nonce, self.nonce, self.session_id, self.flags, self.key_id
        )
        auth = wire.Auth(
            wire.PROTOCOL_VERSION, self.nonce, self.session_id, self.flags, self.key_id, mac
        )
        self._out.append(wire.encode_auth(auth, self.crc))
        return ClientState.AWAIT_VERDICT, None

    def _on_welcome(self, frame: object) -> _ClientStep:
        assert isinstance(frame, wire.Welcome)
        expected = server_proof(
            self.psk, self.server_nonce, self.nonce, self.session_id, frame.flags
        )
        if not proofs_equal(expected, frame.mac):
            # In plaintext mode this MAC is the server's only proof (SPEC.md section 2).
            reason = "the server could not prove it holds the key; check --psk-file"
            return ClientState.FAILED, Failed(reason)
        if self.flags & wire.AUTH_JOIN_ONLY and frame.flags & wire.WELCOME_CREATED:
            return ClientState.FAILED, Failed("server created a session we asked to join")
        return ClientState.JOINED, Joined(frame.flags)

    def _on_reject(self, frame: object) -> _ClientStep:
        assert isinstance(frame, wire.Reject)
        reason = frame.reason or REJECT_REASONS.get(frame.code, f"code {frame.code}")
        return ClientState.REJECTED, Rejected(frame.code, reason)

    def _on_timeout(self, _: object) -> _ClientStep:
        return ClientState.FAILED, Failed("handshake timed out")

    def _on_lost(self, _: object) -> _ClientStep:
        return ClientState.FAILED, Failed("connection lost during the handshake")


_ClientHandler: TypeAlias = Callable[[ClientHandshake, object], _ClientStep]

# The client's transitions, all of them: (state, input) -> (handler, states it may move to).
_ClientTable: TypeAlias = dict[
    tuple[ClientState, Input], tuple[_ClientHandler, frozenset[ClientState]]
]
_CLIENT_TABLE: Final[_ClientTable] = {
    (ClientState.AWAIT_CHALLENGE, Input.CHALLENGE): (
        ClientHandshake._on_challenge,
        frozenset({ClientState.AWAIT_VERDICT, ClientState.FAILED}),
    ),
    (ClientState.AWAIT_VERDICT, Input.WELCOME): (
        ClientHandshake._on_welcome,
        frozenset({ClientState.JOINED, ClientState.FAILED}),
    ),
    (ClientState.AWAIT_VERDICT, Input.REJECT): (
        ClientHandshake._on_reject,
        frozenset({ClientState.REJECTED}),
    ),
    **{
        (state, Input.TIMEOUT): (ClientHandshake._on_timeout, frozenset({ClientState.FAILED}))
        for state in (ClientState.AWAIT_CHALLENGE, ClientState.AWAIT_VERDICT)
    },
    **{
        (state, Input.LOST): (ClientHandshake._on_lost, frozenset({ClientState.FAILED}))
        for state in (ClientState.AWAIT_CHALLENGE, ClientState.AWAIT_VERDICT)
    },
}
_CLIENT_EXPECTS: Final = {
    ClientState.AWAIT_CHALLENGE: "CHALLENGE",
    ClientState.AWAIT_VERDICT: "WELCOME or REJECT",
}


# -------------------------------------------------------------------- server


_ServerStep: TypeAlias = tuple[ServerState, Outcome | None]
# Verified against an unknown key id, so that an unknown id costs the same time as a known one.
_NO_KEY: Final = b"\0" * 32


class ServerHandshake:
    """The server end: CHALLENGE, verify the AUTH proof, answer the registry's decision."""

    def __init__(self, keys: Mapping[str, bytes], crc: bool, nonce: bytes | None = None) -> None:
        self.keys = keys
        self.crc = crc
        self.nonce = new_nonce() if nonce is None else nonce
        self._state = ServerState.NEW
        self._out: list[bytes] = []
        self.auth: wire.Auth | None = None  # the AUTH received, once there is one

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def key_id(self) -> str:
        """The key id the peer claimed (from the network: escape it before logging)."""
        return "" if self.auth is None else self.auth.key_id

    def data_to_send(self) -> bytes:
        """Return (and drain) the bytes owed to the client."""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def start(self) -> None:
        """Send the CHALLENGE (admission decides when)."""
        self._step(Input.START, None)

    def receive(self, frame: wire.Frame) -> Outcome | None:
        return self._step(frame_input(frame), frame)

    def attached(self, flags: int) -> Outcome | None:
        """The registry placed the subflow in a session: WELCOME with ``flags``."""
        return self._step(Input.ATTACHED, flags)

    def refused(self, code: int, reason: str = "") -> Outcome | None:
        """The registry refused the subflow: REJECT ``code``."""
        return self._step(Input.REFUSED, (code, reason or REJECT_REASONS.get(code, "")))

    def timeout(self) -> Outcome | None:
        return self._step(Input.TIMEOUT, None)

    def lost(self) -> Outcome | None:
        return self._step(Input.LOST, None)

    def _step(self, inp: Input, payload: object) -> Outcome | None:
        if self._state in _SERVER_TERMINAL:
            return None  # late events change nothing
        self._state, outcome = _transition(
            self, self._state, inp, payload, _SERVER_TABLE, ServerState.FAILED, _SERVER_EXPECTS
        )
        return outcome

    def _reject(self, code: int, reason: str) -> _ServerStep:
        self._out.append(wire.encode_reject(code, reason, self.crc))
        return ServerState.REJECTED, Rejected(code, reason)

    def _on_start(self, _: object) -> _ServerStep:
        self._out.append(wire.encode_challenge(self.nonce, self.crc))
        return ServerState.CHALLENGED, None

    def _on_auth(self, frame: object) -> _ServerStep:
        assert isinstance(frame, wire.Auth)
        self.auth = frame
        if frame.version != wire.PROTOCOL_VERSION:
            return self._reject(wire.REJECT_VERSION, REJECT_REASONS[wire.REJECT_VERSION])
        psk = self.keys.get(frame.key_id)
        expected = client_proof(
            psk or _NO_KEY, self.nonce, frame.nonce, frame.session_id, frame.flags, frame.key_id
        )
        if not proofs_equal(expected, frame.mac) or psk is None:
            return self._reject(wire.REJECT_BAD_AUTH, REJECT_REASONS[wire.REJECT_BAD_AUTH])
        return ServerState.PROVEN, Proven(frame.key_id, frame.session_id, frame.flags)

    def _on_attached(self, flags: object) -> _ServerStep:
        assert isinstance(flags, int) and self.auth is not None
        auth = self.auth
        proof = server_proof(self.keys[auth.key_id], self.nonce, auth.nonce, auth.session_id, flags)
        self._out.append(wire.encode_welcome(wire.Welcome(flags, proof), self.crc))
        return ServerState.JOINED, Joined(flags)

    def _on_refused(self, payload: object) -> _ServerStep:
        assert isinstance(payload, tuple)
        code, reason = payload
        return self._reject(code, reason)

    def _on_timeout(self, _: object) -> _ServerStep:
        return ServerState.FAILED, Failed("handshake timed out")

    def _on_lost(self, _: object) -> _ServerStep:
        return ServerState.FAILED, Failed("connection lost during the handshake")


_ServerHandler: TypeAlias = Callable[[ServerHandshake, object], _ServerStep]
_SERVER_LIVE: Final = (ServerState.NEW, ServerState.CHALLENGED, ServerState.PROVEN)

# The server's transitions, all of them: (state, input) -> (handler, states it may move to).
_ServerTable: TypeAlias = dict[
    tuple[ServerState, Input], tuple[_ServerHandler, frozenset[ServerState]]
]
_SERVER_TABLE: Final[_ServerTable] = {
    (ServerState.NEW, Input.START): (
        ServerHandshake._on_start,
        frozenset({ServerState.CHALLENGED}),
    ),
    (ServerState.CHALLENGED, Input.AUTH): (
        ServerHandshake._on_auth,
        frozenset({ServerState.PROVEN, ServerState.REJECTED}),
    ),
    (ServerState.PROVEN, Input.ATTACHED): (
        ServerHandshake._on_attached,
        frozenset({ServerState.JOINED}),
    ),
    (ServerState.PROVEN, Input.REFUSED): (
        ServerHandshake._on_refused,
        frozenset({ServerState.REJECTED}),
    ),
    **{
        (state, Input.TIMEOUT): (ServerHandshake._on_timeout, frozenset({ServerState.FAILED}))
        for state in _SERVER_LIVE
    },
    **{
        (state, Input.LOST): (ServerHandshake._on_lost, frozenset({ServerState.FAILED}))
        for state in _SERVER_LIVE
    },
}
_SERVER_EXPECTS: Final = {
    ServerState.NEW: "nothing before the CHALLENGE",
    ServerState.CHALLENGED: "AUTH",
    ServerState.PROVEN: "nothing before the WELCOME",
}
