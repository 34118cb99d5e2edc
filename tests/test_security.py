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
from twisted.internet.task import Clock
from twisted.python.usage import UsageError

from stripeproxy.cli import server_tap
from stripeproxy.cli.keygen import load_keys, write_psk
from stripeproxy.cli.keygen import main as keygen_main
from stripeproxy.core import handshake, socks5, wire
from stripeproxy.core.guard import AuthGuard
from stripeproxy.core.session import MiB, SessionConfig
from stripeproxy.net.registry import SessionRegistry
from stripeproxy.net.server import ServerSettings


def test_auth_guard_counts_per_address_within_the_window() -> None:
    clock = Clock()
    guard = AuthGuard(clock, limit=3, window=60.0)
    assert [guard.failed("10.0.0.1") for _ in range(3)] == [1, 2, 3]
    assert guard.blocked("10.0.0.1")
    assert not guard.blocked("10.0.0.2")  # other addresses are not affected
    clock.advance(59.9)
    assert guard.blocked("10.0.0.1")
    clock.advance(0.1)
    assert not guard.blocked("10.0.0.1")  # the window has passed
    assert guard.failed("10.0.0.1") == 1


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
async def test_failed_logins_are_limited_per_address(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    server = await start_server(
        cleanup, keys, False, ["--auth-failures", "3", "--auth-window", "600"]
    )
    await start_client(cleanup, keys, server.port, False, k=2, psk=keys.wrong_psk)
    guard = server.registry.guard
    await wait_for(lambda: guard.blocked("127.0.0.1"), "the address to be refused", timeout=30)
    failures = [m for m in log_messages if "authentication failed (key id" in m]  # server's
    assert len(failures) == 3  # logged up to the limit, then refused silently
    assert "refusing this address for now" in failures[-1]
    assert server.sessions == []


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
    # That client is now refused even with the right key; another is not.
    answer = await in_thread(login_via_proxy_header, server.port, "203.0.113.7", psk)
    assert isinstance(answer, wire.Reject)
    answer = await in_thread(login_via_proxy_header, server.port, "203.0.113.8", psk)
    assert isinstance(answer, wire.Welcome)
    await wait_for(lambda: len(server.sessions) == 1, "the session of 203.0.113.8")


def test_proxy_protocol_is_not_wrapped_twice(keys: Keys) -> None:
    options = server_tap.Options()
    argv = ["--no-tls", "--psk-file", keys.psk, "--proxy-protocol", "--listen", "haproxy:tcp:0"]
    with pytest.raises(UsageError, match="already wraps"):
        options.parseOptions(argv)
