"""The subflow handshake (SPEC.md section 2): proofs and both sans-I/O state machines."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stripeproxy.core import handshake, wire
from stripeproxy.core.handshake import (
    ClientHandshake,
    ClientState,
    Failed,
    Input,
    Joined,
    Proven,
    Rejected,
    ServerHandshake,
    ServerState,
    StateError,
)

PSK = bytes(range(32))
SERVER_NONCE = b"\x11" * 32
CLIENT_NONCE = b"\x22" * 32
SESSION_ID = b"\x33" * 16

# Known answers, also in SPEC.md section 2 (checked there against `openssl dgst -hmac`).
# psk = 00 01 .. 1f, server_nonce = 32 x 11, client_nonce = 32 x 22, session_id = 16 x 33.
CLIENT_PROOF_VECTORS = [
    (1, "alice", "1bc7fea26e3853d97652f693048134ced8706f3461a17f151d5a293f03198872"),
    (0, "", "2644c0c534e2af15ad45191bfa347ed0a3d26aabec55e29e78871c73396cb78e"),
]
SERVER_PROOF_VECTORS = [
    (1, "5b9d67dd15cedd9e154c1e9525fd93242d96cc1330695d95af921b5043a4fdd5"),
    (0, "b5651ca2d763f1910399f0cbe4c749f003f8a8cfd19ad57066b5cb07b258e8a0"),
]


@pytest.mark.parametrize(("flags", "key_id", "expected"), CLIENT_PROOF_VECTORS)
def test_client_proof_known_answers(flags: int, key_id: str, expected: str) -> None:
    proof = handshake.client_proof(PSK, SERVER_NONCE, CLIENT_NONCE, SESSION_ID, flags, key_id)
    assert proof.hex() == expected


@pytest.mark.parametrize(("flags", "expected"), SERVER_PROOF_VECTORS)
def test_server_proof_known_answers(flags: int, expected: str) -> None:
    proof = handshake.server_proof(PSK, SERVER_NONCE, CLIENT_NONCE, SESSION_ID, flags)
    assert proof.hex() == expected


def _hmac(*parts: bytes) -> bytes:
    return hmac.new(PSK, b"".join(parts), hashlib.sha256).digest()


# ---------------------------------------------------------------- machines


def server_at(state: ServerState, keys: dict[str, bytes] | None = None) -> ServerHandshake:
    """A server handshake driven to ``state`` along the ordinary path."""
    server = ServerHandshake(keys or {"": PSK}, crc=True, nonce=SERVER_NONCE)
    if state is ServerState.NEW:
        return server
    server.start()
    server.data_to_send()
    if state is ServerState.CHALLENGED:
        return server
    if state is ServerState.FAILED:
        server.timeout()
        return server
    if state is ServerState.REJECTED:
        server.receive(auth_frame(mac=b"\0" * 32))
    else:
        assert isinstance(server.receive(auth_frame()), Proven)
        if state is ServerState.JOINED:
            server.attached(wire.WELCOME_CREATED)
    server.data_to_send()
    assert server.state is state
    return server


def auth_frame(
    mac: bytes | None = None, flags: int = 0, key_id: str = "", version: int = 1
) -> wire.Auth:
    if mac is None:
        mac = handshake.client_proof(PSK, SERVER_NONCE, CLIENT_NONCE, SESSION_ID, flags, key_id)
    return wire.Auth(version, CLIENT_NONCE, SESSION_ID, flags, key_id, mac)


def client_at(state: ClientState, join_only: bool = False) -> ClientHandshake:
    client = ClientHandshake(
        PSK, "", crc=True, choose_session=lambda: (SESSION_ID, join_only), nonce=CLIENT_NONCE
    )
    if state is ClientState.AWAIT_CHALLENGE:
        return client
    if state is ClientState.FAILED:
        client.timeout()
        return client
    client.receive(wire.Challenge(1, SERVER_NONCE))
    client.data_to_send()
    if state is ClientState.JOINED:
        assert isinstance(client.receive(welcome(0)), Joined)
    elif state is ClientState.REJECTED:
        client.receive(wire.Reject(wire.REJECT_BAD_AUTH, ""))
    assert client.state is state
    return client


def welcome(flags: int, mac: bytes | None = None) -> wire.Welcome:
    if mac is None:
        mac = handshake.server_proof(PSK, SERVER_NONCE, CLIENT_NONCE, SESSION_ID, flags)
    return wire.Welcome(flags, mac)


def decode(data: bytes) -> list[wire.Frame]:
    return wire.FrameDecoder(crc=True).feed(data)


def test_a_full_handshake_between_the_two_machines() -> None:
    server = ServerHandshake({"k": PSK}, crc=False)
    client = ClientHandshake(PSK, "k", crc=False, choose_session=lambda: (SESSION_ID, False))
    server.start()
    (challenge,) = wire.FrameDecoder(crc=False).feed(server.data_to_send())
    assert client.receive(challenge) is None
    (auth,) = wire.FrameDecoder(crc=False).feed(client.data_to_send())
    assert server.receive(auth) == Proven("k", SESSION_ID, 0)
    assert server.attached(wire.WELCOME_CREATED) == Joined(wire.WELCOME_CREATED)
    (answer,) = wire.FrameDecoder(crc=False).feed(server.data_to_send())
    assert client.receive(answer) == Joined(wire.WELCOME_CREATED)
    assert (client.state, server.state) == (ClientState.JOINED, ServerState.JOINED)


# Representative payloads per input: a valid frame of each kind, or the local input.
FRAMES: dict[Input, wire.Frame] = {
    Input.CHALLENGE: wire.Challenge(1, SERVER_NONCE),
    Input.AUTH: auth_frame(),
    Input.WELCOME: welcome(0),
    Input.REJECT: wire.Reject(wire.REJECT_TOO_MANY_SESSIONS, "too many sessions"),
    Input.OTHER_FRAME: wire.Ping(7),
}


def feed_server(server: ServerHandshake, inp: Input) -> object:
    if inp in FRAMES:
        return server.receive(FRAMES[inp])
    return {
        Input.START: server.start,
        Input.ATTACHED: lambda: server.attached(0),
        Input.REFUSED: lambda: server.refused(wire.REJECT_TOO_MANY_SUBFLOWS),
        Input.TIMEOUT: server.timeout,
        Input.LOST: server.lost,
    }[inp]()


def feed_client(client: ClientHandshake, inp: Input) -> object:
    if inp in FRAMES:
        return client.receive(FRAMES[inp])
    if inp is Input.TIMEOUT:
        return client.timeout()
    if inp is Input.LOST:
        return client.lost()
    raise StateError(f"{inp.name} is not a client input")  # the client has no other


SERVER_EXPECTED: dict[tuple[ServerState, Input], ServerState] = {
    (ServerState.NEW, Input.START): ServerState.CHALLENGED,
    (ServerState.CHALLENGED, Input.AUTH): ServerState.PROVEN,
    (ServerState.PROVEN, Input.ATTACHED): ServerState.JOINED,
    (ServerState.PROVEN, Input.REFUSED): ServerState.REJECTED,
}
CLIENT_EXPECTED: dict[tuple[ClientState, Input], ClientState] = {
    (ClientState.AWAIT_CHALLENGE, Input.CHALLENGE): ClientState.AWAIT_VERDICT,
    (ClientState.AWAIT_VERDICT, Input.WELCOME): ClientState.JOINED,
    (ClientState.AWAIT_VERDICT, Input.REJECT): ClientState.REJECTED,
}
SERVER_TERMINAL = {ServerState.JOINED, ServerState.REJECTED, ServerState.FAILED}
CLIENT_TERMINAL = {ClientState.JOINED, ClientState.REJECTED, ClientState.FAILED}


@pytest.mark.parametrize("inp", list(Input))
@pytest.mark.parametrize("state", list(ServerState))
def test_server_every_state_and_input(state: ServerState, inp: Input) -> None:
    """The table's moves happen; terminal states absorb everything; any other
    frame is a protocol error (FAILED), any other local input a StateError."""
    server = server_at(state)
    if state in SERVER_TERMINAL:
        assert feed_server(server, inp) is None
        assert server.state is state and server.data_to_send() == b""
    elif (state, inp) in SERVER_EXPECTED:
        feed_server(server, inp)
        assert server.state is SERVER_EXPECTED[state, inp]
    elif inp in (Input.TIMEOUT, Input.LOST):
        assert isinstance(feed_server(server, inp), Failed)
        assert server.state is ServerState.FAILED and server.data_to_send() == b""
    elif inp in FRAMES:
        outcome = feed_server(server, inp)
        assert isinstance(outcome, Failed) and "expected" in outcome.reason
        assert server.state is ServerState.FAILED and server.data_to_send() == b""
    else:
        with pytest.raises(StateError):
            feed_server(server, inp)
        assert server.state is state


@pytest.mark.parametrize("inp", list(Input))
@pytest.mark.parametrize("state", list(ClientState))
def test_client_every_state_and_input(state: ClientState, inp: Input) -> None:
    client = client_at(state)
    if inp not in FRAMES and inp not in (Input.TIMEOUT, Input.LOST):
        return  # START, ATTACHED, REFUSED are server inputs: the client has no method for them
    if state in CLIENT_TERMINAL:
        assert feed_client(client, inp) is None
        assert client.state is state and client.data_to_send() == b""
    elif (state, inp) in CLIENT_EXPECTED:
        feed_client(client, inp)
        assert client.state is CLIENT_EXPECTED[state, inp]
    else:
        assert isinstance(feed_client(client, inp), Failed)
        assert client.state is ClientState.FAILED and client.data_to_send() == b""


frames = st.one_of(
    st.builds(wire.Challenge, st.integers(0, 255), st.binary(min_size=32, max_size=32)),
    st.builds(
        wire.Auth,
        st.integers(0, 255),
        st.binary(min_size=32, max_size=32),
        st.binary(min_size=16, max_size=16),
        st.integers(0, 255),
        st.text(max_size=8),
        st.binary(min_size=32, max_size=32),
    ),
    st.builds(wire.Welcome, st.integers(0, 255), st.binary(min_size=32, max_size=32)),
    st.builds(wire.Reject, st.integers(0, 255), st.text(max_size=20)),
    st.builds(wire.Ping, st.integers(0, 2**64 - 1)),
    st.builds(wire.GoAway, st.integers(0, 255), st.text(max_size=20)),
    st.builds(wire.Data, st.integers(0, 2**32 - 1), st.integers(0, 2**40), st.binary(min_size=1)),
)
server_events = st.one_of(
    frames, st.sampled_from(["start", "attached", "refused", "timeout", "lost"])
)


@given(st.lists(server_events, max_size=12))
def test_server_random_walks_never_join_without_a_proof(events: list[object]) -> None:
    """Whatever arrives in whatever order: the state only moves along the
    table, only a StateError (our misuse, never the peer's input) escapes, and
    PROVEN needs the proof for this CHALLENGE's nonce."""
    server = ServerHandshake({"": PSK}, crc=True, nonce=SERVER_NONCE)
    for event in events:
        before = server.state
        try:
            if isinstance(event, str):
                outcome = {
                    "start": server.start,
                    "attached": lambda: server.attached(0),
                    "refused": lambda: server.refused(wire.REJECT_TOO_MANY_SESSIONS),
                    "timeout": server.timeout,
                    "lost": server.lost,
                }[event]()
            else:
                assert isinstance(
                    event,
                    wire.Ping
                    | wire.GoAway
                    | wire.Data
                    | wire.Auth
                    | wire.Challenge
                    | wire.Welcome
                    | wire.Reject,
                )
                outcome = server.receive(event)
        except StateError:
            assert isinstance(event, str) and before not in SERVER_TERMINAL
            assert server.state is before
            continue
        if before in SERVER_TERMINAL:
            assert server.state is before and outcome is None
        if isinstance(outcome, Proven):
            assert isinstance(event, wire.Auth) and event.version == 1
            expected = handshake.client_proof(
                PSK, SERVER_NONCE, event.nonce, event.session_id, event.flags, event.key_id
            )
            assert event.mac == expected and event.key_id == ""
        for frame in decode(server.data_to_send()):
            assert isinstance(frame, wire.Challenge | wire.Welcome | wire.Reject)


@given(st.lists(st.one_of(frames, st.sampled_from(["timeout", "lost"])), max_size=12))
def test_client_random_walks_never_join_without_the_servers_proof(events: list[object]) -> None:
    client = ClientHandshake(
        PSK, "", crc=True, choose_session=lambda: (SESSION_ID, False), nonce=CLIENT_NONCE
    )
    for event in events:
        before = client.state
        if event == "timeout":
            outcome = client.timeout()
        elif event == "lost":
            outcome = client.lost()
        else:
            assert isinstance(
                event,
                wire.Ping
                | wire.GoAway
                | wire.Data
                | wire.Auth
                | wire.Challenge
                | wire.Welcome
                | wire.Reject,
            )
            outcome = client.receive(event)
        if before in CLIENT_TERMINAL:
            assert client.state is before and outcome is None
        if isinstance(outcome, Joined):
            assert isinstance(event, wire.Welcome)
            assert event.mac == handshake.server_proof(
                PSK, client.server_nonce, CLIENT_NONCE, SESSION_ID, event.flags
            )
        for frame in decode(client.data_to_send()):
            assert isinstance(frame, wire.Auth)


# ------------------------------------------------------------- adversaries


def test_client_refuses_a_forged_welcome() -> None:
    """In plaintext mode the WELCOME MAC is the server's only proof."""
    for forged in (
        b"\0" * 32,
        handshake.server_proof(b"another key!" * 3, SERVER_NONCE, CLIENT_NONCE, SESSION_ID, 0),
        # Replayed from a handshake with another client nonce.
        handshake.server_proof(PSK, SERVER_NONCE, b"\x44" * 32, SESSION_ID, 0),
        # A valid proof for other flags.
        handshake.server_proof(PSK, SERVER_NONCE, CLIENT_NONCE, SESSION_ID, 1),
    ):
        client = client_at(ClientState.AWAIT_VERDICT)
        outcome = client.receive(wire.Welcome(0, forged))
        assert isinstance(outcome, Failed) and "could not prove" in outcome.reason
        assert client.state is ClientState.FAILED
    assert isinstance(client_at(ClientState.AWAIT_VERDICT).receive(welcome(0)), Joined)


def test_client_refuses_a_created_session_it_asked_to_join() -> None:
    client = client_at(ClientState.AWAIT_VERDICT, join_only=True)
    outcome = client.receive(welcome(wire.WELCOME_CREATED))
    assert isinstance(outcome, Failed) and "asked to join" in outcome.reason


def test_client_does_not_answer_another_protocol_version() -> None:
    client = client_at(ClientState.AWAIT_CHALLENGE)
    assert isinstance(client.receive(wire.Challenge(2, SERVER_NONCE)), Failed)
    assert client.data_to_send() == b""


def test_a_recorded_auth_is_rejected_against_a_fresh_challenge() -> None:
    recorded = auth_frame()
    first = server_at(ServerState.CHALLENGED)
    assert isinstance(first.receive(recorded), Proven)
    fresh = ServerHandshake({"": PSK}, crc=True)  # a new random nonce
    fresh.start()
    fresh.data_to_send()
    assert fresh.receive(recorded) == Rejected(wire.REJECT_BAD_AUTH, "authentication failed")
    assert decode(fresh.data_to_send()) == [
        wire.Reject(wire.REJECT_BAD_AUTH, "authentication failed")
    ]


def test_unknown_key_ids_and_other_versions_are_rejected() -> None:
    server = server_at(ServerState.CHALLENGED)
    mac = handshake.client_proof(PSK, SERVER_NONCE, CLIENT_NONCE, SESSION_ID, 0, "mallory")
    outcome = server.receive(auth_frame(mac=mac, key_id="mallory"))
    assert isinstance(outcome, Rejected) and outcome.code == wire.REJECT_BAD_AUTH
    server = server_at(ServerState.CHALLENGED)
    outcome = server.receive(auth_frame(version=2))
    assert isinstance(outcome, Rejected) and outcome.code == wire.REJECT_VERSION


def test_the_client_proof_covers_the_server_nonce() -> None:
    """Mutation: a client proof computed without the server nonce (the one
    that would let a recorded AUTH be replayed) must not verify."""
    label = b"stripeproxy v1 client proof"
    without = _hmac(label, CLIENT_NONCE, SESSION_ID, b"\0")
    zeroed = _hmac(label, b"\0" * 32, CLIENT_NONCE, SESSION_ID, b"\0")
    for mac in (without, zeroed):
        outcome = server_at(ServerState.CHALLENGED).receive(auth_frame(mac=mac))
        assert isinstance(outcome, Rejected) and outcome.code == wire.REJECT_BAD_AUTH
    # The formula itself, so the mutation above is the only difference.
    assert _hmac(label, SERVER_NONCE, CLIENT_NONCE, SESSION_ID, b"\0") == auth_frame().mac


def test_the_server_proof_covers_the_client_nonce() -> None:
    label = b"stripeproxy v1 server proof"
    without = _hmac(label, SERVER_NONCE, SESSION_ID, b"\0")
    zeroed = _hmac(label, SERVER_NONCE, b"\0" * 32, SESSION_ID, b"\0")
    for mac in (without, zeroed):
        outcome = client_at(ClientState.AWAIT_VERDICT).receive(wire.Welcome(0, mac))
        assert isinstance(outcome, Failed)
    assert _hmac(label, SERVER_NONCE, CLIENT_NONCE, SESSION_ID, b"\0") == welcome(0).mac


@given(st.sampled_from(["server_nonce", "client_nonce", "session_id"]), st.integers(0, 255))
def test_every_nonce_byte_is_covered_by_both_proofs(field: str, bit: int) -> None:
    values = {"server_nonce": SERVER_NONCE, "client_nonce": CLIENT_NONCE, "session_id": SESSION_ID}
    original = values[field]
    index, mask = bit % len(original), 1 << (bit % 8)
    flipped = bytearray(original)
    flipped[index] ^= mask
    mutated = {**values, field: bytes(flipped)}
    assert handshake.client_proof(PSK, **mutated, flags=0, key_id="") != handshake.client_proof(
        PSK, **values, flags=0, key_id=""
    )
    assert handshake.server_proof(PSK, **mutated, flags=0) != handshake.server_proof(
        PSK, **values, flags=0
    )
