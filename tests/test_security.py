"""Access control on the server: target policy, named keys, failed-login limits."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import pytest_twisted
from helpers import (
    Cleanup,
    EchoFactory,
    Keys,
    in_thread,
    next_frame,
    sleep,
    socks_connect,
    socks_echo,
    socks_handshake_reply,
    start_client,
    start_pair,
    start_server,
    start_target,
    wait_for,
)
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.usage import UsageError

from stripeproxy.cli import server_tap
from stripeproxy.cli.keygen import load_keys, write_psk
from stripeproxy.cli.keygen import main as keygen_main
from stripeproxy.core import control, handshake, socks5, wire
from stripeproxy.core.admission import Admission, AdmissionLimits
from stripeproxy.core.session import MiB, SessionConfig
from stripeproxy.net.registry import SessionRegistry
from stripeproxy.net.server import ServerSettings


def test_failed_logins_are_counted_per_address_and_forgotten_after_a_quiet_window() -> None:
    """Each failure delays the address's next CHALLENGE longer; other addresses
    are not affected; after the window without a failure it is all forgotten."""
    admission = Admission(AdmissionLimits(failures_logged=3, failure_window=60.0), log=Logger())
    assert [admission.auth_failed("10.0.0.1", "", float(t)) for t in range(3)] == [0.5, 1.0, 2.0]
    assert admission.failures("10.0.0.1", 2.0) == 3
    assert admission.challenge_delay("10.0.0.1", 2.5) == 1.5
    assert admission.failures("10.0.0.2", 2.0) == 0  # other addresses are not affected
    assert admission.failures("10.0.0.1", 61.9) == 3
    assert admission.failures("10.0.0.1", 62.0) == 0  # the window has passed quietly
    assert admission.auth_failed("10.0.0.1", "", 62.0) == 0.5


@pytest_twisted.ensureDeferred
async def test_denied_network_gets_reply_0x02_even_by_name(cleanup: Cleanup, keys: Keys) -> None:
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(
        cleanup, keys, False, k=2, server_extra=["--deny", "127.0.0.0/8", "--deny", "::1/128"]
    )
    for host in ("127.0.0.1", "localhost"):  # a name that resolves into the denied network
        reply = await in_thread(socks_handshake_reply, pair.socks_port, host, target.port)
        assert reply == socks5.REPLY_NOT_ALLOWED, host
    assert target.factory.connections == 0
    assert len(pair.server_driver().subflows) == 2  # the session is unaffected


@pytest_twisted.ensureDeferred
async def test_allow_rules_restrict_ports(cleanup: Cleanup, keys: Keys) -> None:
    target = await start_target(cleanup, EchoFactory())
    other = await start_target(cleanup, EchoFactory())
    pair = await start_pair(
        cleanup, keys, True, k=2, server_extra=["--allow", f"127.0.0.1/32:{target.port}"]
    )
    ok = await in_thread(socks_handshake_reply, pair.socks_port, "127.0.0.1", target.port)
    assert ok == socks5.REPLY_SUCCEEDED
    no = await in_thread(socks_handshake_reply, pair.socks_port, "127.0.0.1", other.port)
    assert no == socks5.REPLY_NOT_ALLOWED
    assert other.factory.connections == 0


@pytest_twisted.ensureDeferred
async def test_named_keys_and_revocation(cleanup: Cleanup, keys: Keys, tmp_path: Path) -> None:
    alice, bob = tmp_path / "alice.key", tmp_path / "bob.key"
    write_psk(str(alice))
    write_psk(str(bob))
    server_keys = tmp_path / "server.keys"
    server_keys.write_text(
        f"alice {load_keys(str(alice))[''].hex()}\n# bob revoked: line removed\n"
    )
    target = await start_target(cleanup, EchoFactory())
    server = await start_server(cleanup, keys, False, ["--psk-file", str(server_keys)])
    good = await start_client(
        cleanup, keys, server.port, False, k=2, psk=str(alice), extra=["--key-id", "alice"]
    )
    await wait_for(
        lambda: good.driver is not None and len(good.driver.subflows) == 2, "alice's subflows"
    )
    reply = await in_thread(socks_handshake_reply, good.socks_port, "127.0.0.1", target.port)
    assert reply == socks5.REPLY_SUCCEEDED
    revoked = await start_client(
        cleanup,
        keys,
        server.port,
        False,
        k=1,
        psk=str(bob),
        extra=["--key-id", "bob", "--open-timeout", "1"],
    )
    reply = await in_thread(socks_handshake_reply, revoked.socks_port, "127.0.0.1", target.port)
    assert reply == socks5.REPLY_GENERAL_FAILURE
    assert len(server.sessions) == 1  # only alice's


@pytest_twisted.ensureDeferred
async def test_failed_logins_cost_the_source_time_but_never_lock_out_the_key(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    """A client with a wrong key keeps failing from 127.0.0.1; the server logs
    --auth-failures of them, the client says so once; a client with the right
    key from the same address (think NAT) still gets in meanwhile."""
    server = await start_server(
        cleanup, keys, False, ["--auth-failures", "3", "--auth-window", "600"]
    )
    # After a bad-key REJECT a client waits a minute before it dials again
    # (SPEC.md section 2): five subflows make the five failures at once.
    await start_client(cleanup, keys, server.port, False, k=5, psk=keys.wrong_psk)
    admission = server.registry.admission
    await wait_for(
        lambda: admission.failures("127.0.0.1", server.registry.now()) >= 5,
        "five failed logins",
        timeout=30,
    )
    failures = [m for m in log_messages if "authentication failed (key id" in m]  # server's
    assert len(failures) == 3  # logged up to the limit, then once a minute
    assert "further failures are logged once a minute" in failures[-1]
    rejected = [m for m in log_messages if "rejected our key" in m]  # the client's
    assert len(rejected) == 1 and "check --psk-file" in rejected[0]
    good = await start_client(cleanup, keys, server.port, False, k=2)
    await wait_for(
        lambda: good.driver is not None and len(good.driver.subflows) == 2,
        "the right key's subflows from the failing address",
        timeout=30,
    )
    assert admission.failures("127.0.0.1", server.registry.now()) >= 5  # still failing
    assert len(server.sessions) == 1


@pytest_twisted.ensureDeferred
async def test_subflow_and_session_limits_affect_only_the_offender(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    target = await start_target(cleanup, EchoFactory())
    server = await start_server(cleanup, keys, False, ["--subflows", "2", "--max-sessions", "1"])
    first = await start_client(cleanup, keys, server.port, False, k=4)
    await wait_for(
        lambda: first.driver is not None and len(first.driver.subflows) == 2,
        "the first client's two subflows",
    )
    # Its other two subflows are refused, again and again, without harm.
    await wait_for(
        lambda: any("too many subflows" in m for m in log_messages), "a too-many-subflows reject"
    )
    assert len(server.sessions) == 1 and len(server.sessions[0].subflows) == 2
    second = await start_client(
        cleanup, keys, server.port, False, k=1, extra=["--open-timeout", "1"]
    )
    await wait_for(
        lambda: any("too many sessions" in m for m in log_messages), "a too-many-sessions reject"
    )
    reply = await in_thread(socks_handshake_reply, second.socks_port, "127.0.0.1", target.port)
    assert reply == socks5.REPLY_GENERAL_FAILURE
    # The first client is unaffected.
    reply = await in_thread(socks_handshake_reply, first.socks_port, "127.0.0.1", target.port)
    assert reply == socks5.REPLY_SUCCEEDED
    assert len(server.sessions) == 1


@pytest_twisted.ensureDeferred
async def test_stream_limit_refuses_only_the_extra_streams(cleanup: Cleanup, keys: Keys) -> None:
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(cleanup, keys, False, k=2, server_extra=["--max-streams", "2"])
    held = [
        await in_thread(socks_connect, pair.socks_port, "127.0.0.1", target.port) for _ in range(2)
    ]
    reply = await in_thread(socks_handshake_reply, pair.socks_port, "127.0.0.1", target.port)
    assert reply == socks5.REPLY_GENERAL_FAILURE  # the third stream
    for sock in held:  # the two admitted streams work on
        assert await in_thread(ping_pong, sock) == b"still here"


def ping_pong(sock: socket.socket) -> bytes:
    with sock:
        sock.sendall(b"still here")
        return sock.recv(100)


@pytest_twisted.ensureDeferred
async def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca(
    cleanup: Cleanup, keys: Keys, tmp_path: Path
) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert keygen_main(["--dir", str(ours), "--client", "alice"]) == 0
    assert keygen_main(["--dir", str(theirs), "--client", "mallory"]) == 0
    target = await start_target(cleanup, EchoFactory())
    server = await start_server(cleanup, keys, True, ["--client-ca", str(ours / "client-ca.crt")])
    alice = await start_client(
        cleanup,
        keys,
        server.port,
        True,
        k=2,
        extra=[
            "--client-cert",
            str(ours / "client-alice.crt"),
            "--client-key",
            str(ours / "client-alice.key"),
        ],
    )
    await wait_for(
        lambda: alice.driver is not None and len(alice.driver.subflows) == 2, "alice's subflows"
    )
    result = await in_thread(socks_echo, alice.socks_port, target.port, 1 << 20)
    assert result.errors == [] and result.received_sha == result.sent_sha
    # The right PSK is not enough without a certificate, or with one from another CA.
    no_cert = await start_client(
        cleanup, keys, server.port, True, k=1, extra=["--open-timeout", "1"]
    )
    foreign = await start_client(
        cleanup,
        keys,
        server.port,
        True,
        k=1,
        extra=[
            "--open-timeout",
            "1",
            "--client-cert",
            str(theirs / "client-mallory.crt"),
            "--client-key",
            str(theirs / "client-mallory.key"),
        ],
    )
    for refused in (no_cert, foreign):
        reply = await in_thread(socks_handshake_reply, refused.socks_port, "127.0.0.1", target.port)
        assert reply == socks5.REPLY_GENERAL_FAILURE
    assert len(server.sessions) == 1  # only alice's
    assert target.factory.connections == 1


def idle_then_talk(socks_port: int, target_port: int, idle: float) -> bytes:
    """Connect, say nothing for ``idle`` seconds, then try an echo; returns
    what came back (b"" when the proxy closed or reset the connection)."""
    sock = socks_connect(socks_port, "127.0.0.1", target_port)
    with sock:
        time.sleep(idle)
        try:
            sock.sendall(b"ping")
            return sock.recv(4)
        except OSError:
            return b""


@pytest_twisted.ensureDeferred
async def test_idle_timeout_resets_only_the_silent_stream(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(cleanup, keys, False, k=2, server_extra=["--idle-timeout", "1"])
    silent = in_thread(idle_then_talk, pair.socks_port, target.port, 3.0)
    # A stream that keeps talking (every 0.2 s, for longer than the timeout) lives.
    talker = await in_thread(socks_connect, pair.socks_port, "127.0.0.1", target.port)
    with talker:
        for _ in range(15):
            talker.sendall(b"ping")
            assert await in_thread(talker.recv, 4) == b"ping"
            await sleep(0.2)
    assert await silent == b""
    assert any("idle too long: reset" in m for m in log_messages)
    assert len(pair.server_driver().subflows) == 2  # the session is untouched


def test_memory_limit_is_shared_among_sessions() -> None:
    config = SessionConfig(session_window=32 * MiB)
    settings = ServerSettings(
        reactor=Clock(), keys={"": b"k" * 32}, config=config, memory_limit=48 * MiB
    )
    registry = SessionRegistry(settings)

    def budgets() -> list[int]:
        return [d.memory_budget for d in registry.sessions.values()]

    drivers = []
    for n in range(1, 5):
        driver, code = registry.attach("", bytes([n]) * 16, 0)
        assert driver is not None and code == wire.WELCOME_CREATED
        drivers.append(driver)
        # Alone, a session gets its whole window; then an equal share each.
        assert budgets() == [min(32 * MiB, 48 * MiB // n)] * n
    for driver in drivers[:3]:
        driver.close("test over")  # the driver tells the registry
    assert budgets() == [32 * MiB]
    drivers[3].close("test over")
    assert registry.sessions == {}


def login_via_proxy_header(port: int, source: str, psk: bytes) -> wire.Frame:
    """One plaintext subflow handshake that starts with a PROXY v1 header
    naming ``source`` as the client; returns the server's answer frame."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"PROXY TCP4 {source} 127.0.0.1 40000 {port}\r\n".encode())
        decoder = wire.FrameDecoder(crc=True)
        challenge = next_frame(s, decoder)
        assert isinstance(challenge, wire.Challenge)
        nonce, session_id = handshake.new_nonce(), handshake.new_session_id()
        mac = handshake.client_proof(psk, challenge.nonce, nonce, session_id, 0, "")
        auth = wire.Auth(wire.PROTOCOL_VERSION, nonce, session_id, 0, "", mac)
        s.sendall(wire.encode_auth(auth, True))
        return next_frame(s, decoder)


@pytest_twisted.ensureDeferred
async def test_proxy_protocol_gives_limits_and_logs_the_client_address(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    """Behind a load balancer every connection comes from its address; with
    --proxy-protocol the failed-login limit counts each client apart."""
    server = await start_server(cleanup, keys, False, ["--proxy-protocol", "--auth-failures", "2"])
    psk, wrong = load_keys(keys.psk)[""], load_keys(keys.wrong_psk)[""]
    for _ in range(2):
        answer = await in_thread(login_via_proxy_header, server.port, "203.0.113.7", wrong)
        assert isinstance(answer, wire.Reject)
    assert any("subflow 203.0.113.7:40000: authentication failed" in m for m in log_messages)
    admission, now = server.registry.admission, server.registry.now()
    assert admission.failures("203.0.113.7", now) == 2  # counted for the client, not the balancer
    assert admission.failures("203.0.113.8", now) == 0 == admission.failures("127.0.0.1", now)
    # That client waits for its answer now, but the right key still gets in; so does another.
    answer = await in_thread(login_via_proxy_header, server.port, "203.0.113.7", psk)
    assert isinstance(answer, wire.Welcome)
    answer = await in_thread(login_via_proxy_header, server.port, "203.0.113.8", psk)
    assert isinstance(answer, wire.Welcome)
    await wait_for(lambda: len(server.sessions) == 2, "the sessions of both clients")


def test_proxy_protocol_is_not_wrapped_twice(keys: Keys) -> None:
    options = server_tap.Options()
    argv = ["--no-tls", "--psk-file", keys.psk, "--proxy-protocol", "--listen", "haproxy:tcp:0"]
    with pytest.raises(UsageError, match="already wraps"):
        options.parseOptions(argv)


# ------------------------------------------------ the proofs under attack (issue 10 item 9)


class ForgingServer(Protocol):
    """A fake server without the key: CHALLENGE, then a WELCOME whose MAC is a
    real server proof replayed from another handshake (another client nonce)."""

    factory: ForgingFactory

    def connectionMade(self) -> None:
        self.decoder = wire.FrameDecoder(crc=True)
        assert self.transport is not None
        self.transport.write(wire.encode_challenge(b"\x11" * 32, True))

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        for frame in self.decoder.feed(data):
            if not isinstance(frame, wire.Auth):
                self.factory.after_welcome.append(frame)
                continue
            self.factory.auths += 1
            proof = handshake.server_proof(
                self.factory.psk, b"\x11" * 32, b"\0" * 32, frame.session_id, 1
            )
            self.transport.write(wire.encode_welcome(wire.Welcome(1, proof), True))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.closed += 1


class ForgingFactory(Factory):
    protocol = ForgingServer
    noisy = False

    def __init__(self, psk: bytes) -> None:
        self.psk = psk
        self.auths = 0
        self.closed = 0
        self.after_welcome: list[wire.Frame] = []


@pytest_twisted.ensureDeferred
async def test_client_refuses_a_forged_welcome(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    """In plaintext mode the WELCOME MAC is the server's only proof: a client
    that accepted any MAC would hand its streams to whoever answers."""
    factory = ForgingFactory(load_keys(keys.psk)[""])
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    cleanup.add(port.stopListening, "stop the forging server")
    client = await start_client(cleanup, keys, port.getHost().port, False, k=1)
    await wait_for(lambda: factory.closed >= 2, "the client to drop two forged WELCOMEs")
    assert factory.auths >= 2
    assert client.overlay.joins == 0
    assert client.driver is None or not client.driver.established
    assert factory.after_welcome == []  # nothing sent on a subflow that did not join
    assert any("could not prove it holds the key" in m for m in log_messages)


def record_then_replay_auth(port: int, psk: bytes, target_port: int) -> list[wire.Frame]:
    """Log in with an AUTH and an OPEN of the target in one segment; then send
    that AUTH, and a second OPEN, on a new connection with a fresh CHALLENGE.
    Returns the server's answers to both."""
    answers = []
    nonce, session_id = handshake.new_nonce(), handshake.new_session_id()
    first_open = control.encode(control.Open(1, "127.0.0.1", target_port))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        decoder = wire.FrameDecoder(crc=True)
        challenge = next_frame(s, decoder)
        assert isinstance(challenge, wire.Challenge)
        mac = handshake.client_proof(psk, challenge.nonce, nonce, session_id, 0, "")
        recorded = wire.encode_auth(wire.Auth(1, nonce, session_id, 0, "", mac), True)
        s.sendall(recorded + b"".join(wire.encode_data(0, 0, first_open, True)))
        answers.append(next_frame(s, decoder))
    second_open = control.encode(control.Open(3, "127.0.0.1", target_port))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        decoder = wire.FrameDecoder(crc=True)
        assert isinstance(next_frame(s, decoder), wire.Challenge)  # a fresh nonce
        data = wire.encode_data(0, len(first_open), second_open, True)
        s.sendall(recorded + b"".join(data))
        answers.append(next_frame(s, decoder))
        try:
            while True:
                answers.append(next_frame(s, decoder))
        except ConnectionError:
            pass  # the server closed after its answer
    return answers


@pytest_twisted.ensureDeferred
async def test_a_recorded_auth_replayed_on_a_fresh_challenge_dials_nothing(
    cleanup: Cleanup, keys: Keys
) -> None:
    target = await start_target(cleanup, EchoFactory())
    server = await start_server(cleanup, keys, False)
    psk = load_keys(keys.psk)[""]
    welcome, replayed, *rest = await in_thread(
        record_then_replay_auth, server.port, psk, target.port
    )
    assert isinstance(welcome, wire.Welcome)  # the recorded login worked...
    await wait_for(lambda: target.factory.connections == 1, "the recorded login's dial")
    assert replayed == wire.Reject(wire.REJECT_BAD_AUTH, "authentication failed")
    assert rest == []
    await sleep(0.3)  # a dial would have reached the target by now
    assert target.factory.connections == 1  # ...its replay dialled nothing
    (session,) = server.sessions
    assert session.subflow_count == 0


def connect_and_close(port: int, psk: bytes, key_id: str, count: int) -> list[wire.Frame]:
    """``count`` logins, each with a new session id, closed at once: the answers."""
    answers = []
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            decoder = wire.FrameDecoder(crc=True)
            challenge = next_frame(s, decoder)
            assert isinstance(challenge, wire.Challenge)
            nonce, session_id = handshake.new_nonce(), handshake.new_session_id()
            mac = handshake.client_proof(psk, challenge.nonce, nonce, session_id, 0, key_id)
            s.sendall(wire.encode_auth(wire.Auth(1, nonce, session_id, 0, key_id, mac), True))
            answers.append(next_frame(s, decoder))
    return answers


@pytest_twisted.ensureDeferred
async def test_one_key_holder_cannot_fill_the_servers_sessions(
    cleanup: Cleanup, keys: Keys, tmp_path: Path, log_messages: list[str]
) -> None:
    """Connect-and-close with one key creates sessions up to its quota (the
    default: 30 a minute), then REJECT 4, logged once with key and address;
    another key holder still gets a session."""
    mallory, alice = b"m" * 32, b"a" * 32
    server_keys = tmp_path / "server.keys"
    server_keys.write_text(f"mallory {mallory.hex()}\nalice {alice.hex()}\n")
    server = await start_server(cleanup, keys, False, ["--psk-file", str(server_keys)])
    answers = await in_thread(connect_and_close, server.port, mallory, "mallory", 40)
    assert all(isinstance(a, wire.Welcome) for a in answers[:30])
    assert all(a == wire.Reject(4, "too many sessions") for a in answers[30:])
    (alice_answer,) = await in_thread(connect_and_close, server.port, alice, "alice", 1)
    assert isinstance(alice_answer, wire.Welcome)
    hits = [m for m in log_messages if "sessions created in" in m]
    assert len(hits) == 1 and "key 'mallory' from 127.0.0.1" in hits[0]
    assert len(server.sessions) == 31
