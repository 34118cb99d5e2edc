"""Hostile input: garbage and slowloris on both ports during a real transfer,
and random frames thrown at the session core."""

from __future__ import annotations

import random
import resource
import socket
import ssl
import struct
from pathlib import Path

import pytest
import pytest_twisted
from helpers import (
    SOCKET_TIMEOUT,
    Cleanup,
    EchoFactory,
    Keys,
    in_thread,
    next_frame,
    socks_echo,
    start_client,
    start_instance,
    start_pair,
    start_server,
    start_target,
    wait_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.python.usage import UsageError

from stripeproxy.cli import server_tap
from stripeproxy.cli.options import MIN_MAX_FRAME_KIB
from stripeproxy.core import wire
from stripeproxy.core.session import MiB
from stripeproxy.testing import C2S, CLIENT, S2C, SERVER, SessionPair

GARBAGE_CONNECTIONS = 1000
SLOWLORIS = 200


def rss_mib() -> float:
    """Peak resident size of this process, MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throw_garbage(ports: list[int], count: int, seed: int) -> int:
    """Open ``count`` connections round-robin, send random bytes, close. Returns failures."""
    rng = random.Random(seed)
    refused = 0
    for i in range(count):
        try:
            with socket.create_connection(("127.0.0.1", ports[i % len(ports)]), timeout=5) as s:
                s.sendall(rng.randbytes(rng.randint(1, 2048)))
                if rng.random() < 0.5:
                    s.shutdown(socket.SHUT_WR)
        except OSError:
            refused += 1
    return refused


def open_slowloris(ports: list[int], count: int) -> list[socket.socket]:
    """Connections that send one byte and then nothing at all.

    A server over its --max-handshakes limit aborts some on accept; those
    are closed here and left out (they are the limit doing its job).
    """
    socks = []
    for i in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", ports[i % len(ports)]), timeout=5)
        except ConnectionResetError:
            continue
        try:
            s.sendall(b"\x05")
        except ConnectionResetError:
            s.close()
            continue
        socks.append(s)
    return socks


def closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(0)
    try:
        while True:
            if not s.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest_twisted.ensureDeferred
async def test_garbage_and_slowloris_on_both_ports_during_a_transfer(
    cleanup: Cleanup, keys: Keys
) -> None:
    target = await start_target(cleanup, EchoFactory())
    timeouts = ["--handshake-timeout", "1"]
    pair = await start_pair(cleanup, keys, True, k=4, client_extra=timeouts, server_extra=timeouts)
    ports = [pair.socks_port, pair.server.port]
    before = rss_mib()
    transfer = in_thread(socks_echo, pair.socks_port, target.port, 64 * MiB, 9)
    lorises = await in_thread(open_slowloris, ports, SLOWLORIS)
    garbage = [in_thread(throw_garbage, ports, GARBAGE_CONNECTIONS // 2, seed) for seed in (1, 2)]
    for d in garbage:
        await d
    result = await transfer
    assert result.errors == []
    assert result.received_sha == result.sent_sha and result.received == 64 * MiB
    # Every slowloris connection is dropped by the handshake timeout.
    await wait_for(
        lambda: all(closed_by_peer(s) for s in lorises), "slowloris connections to be closed"
    )
    for s in lorises:
        s.close()
    # The session never noticed: same K subflows, no session created by garbage.
    assert len(pair.server.sessions) == 1
    assert len(pair.server_driver().subflows) == 4
    grown = rss_mib() - before
    print(f"\npeak RSS grew by {grown:.1f} MiB over {GARBAGE_CONNECTIONS} garbage connections")
    assert grown < 200, f"RSS grew by {grown:.1f} MiB"


frames = st.one_of(
    st.builds(
        wire.Data,
        st.integers(0, 5),
        st.integers(0, 2**20),
        st.binary(min_size=1, max_size=64),
    ),
    st.builds(
        wire.Ack,
        st.integers(0, 5),
        st.integers(0, 2**21),
        st.integers(0, 2**22),
        st.lists(st.tuples(st.integers(0, 2**21), st.integers(1, 4096)), max_size=3).map(
            lambda rs: tuple((s, s + n) for s, n in sorted(rs))
        ),
    ),
    st.builds(wire.Ping, st.integers(0, 2**63)),
    st.builds(wire.Pong, st.integers(0, 2**63)),
    st.builds(wire.GoAway, st.integers(0, 255), st.text(max_size=20)),
    st.builds(wire.Challenge, st.integers(0, 3), st.binary(min_size=32, max_size=32)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([C2S, S2C]), frames), max_size=12), st.booleans())
def test_random_frames_never_crash_the_core(
    injected: list[tuple[str, wire.Frame]], first_open: bool
) -> None:
    """Whatever a peer sends after the handshake: a closed subflow or session, no crash."""
    pair = SessionPair(k=2)
    if first_open:
        stream_id = pair.open_stream()
        pair.settle()
        pair.write(CLIENT, stream_id, b"x" * 3000)
    for direction, frame in injected:
        alive = pair.alive
        if not alive:
            break
        before = {side: len(pair.owner(side).closed_subflows) for side in (CLIENT, SERVER)}
        pair.inject(alive[0], direction, [frame])  # type: ignore[arg-type]
        pair.deliver_all()
        # The frame was refused by closing the one subflow it came on (or the
        # whole session), or it was harmless: nothing else was dropped.
        receiver = SERVER if direction == C2S else CLIENT
        for side in (CLIENT, SERVER):
            closed = pair.owner(side).closed_subflows[before[side] :]
            assert all(reason for _, reason in closed), closed
            if side != receiver and not pair.owner(side).session_closes:
                assert closed == [], (side, closed)
    pair.shutdown()
    for side in (CLIENT, SERVER):
        assert pair.owner(side).session_closes, side  # both ended, saying why
    assert pair.clock.getDelayedCalls() == []


def oversized_auth(port: int) -> bytes:
    """Read the CHALLENGE, then announce an AUTH body far beyond any handshake
    frame; return what the server sends before closing (b"" on a reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as s:
        assert isinstance(next_frame(s, wire.FrameDecoder(crc=True)), wire.Challenge)
        s.sendall(struct.pack(">BBI", wire.T_AUTH, 0, 100_000) + b"\0" * 1000)
        try:
            return s.recv(4096)
        except ConnectionResetError:
            return b""


@pytest_twisted.ensureDeferred
async def test_unauthenticated_peer_cannot_announce_a_big_frame(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    # A long handshake timeout: the close must come from the frame limit.
    server = await start_server(cleanup, keys, False, ["--handshake-timeout", "60"])
    assert await in_thread(oversized_auth, server.port) == b""
    assert any(f"exceeds {wire.HANDSHAKE_MAX_BODY}" in m for m in log_messages), (
        "the server names the limit"
    )
    assert server.sessions == []


@pytest_twisted.ensureDeferred
async def test_smallest_max_frame_still_carries_full_chunks(cleanup: Cleanup, keys: Keys) -> None:
    target = await start_target(cleanup, EchoFactory())
    limit = ["--max-frame", str(MIN_MAX_FRAME_KIB)]
    pair = await start_pair(cleanup, keys, True, k=2, client_extra=limit, server_extra=limit)
    result = await in_thread(socks_echo, pair.socks_port, target.port, 8 * MiB, 3)
    assert result.errors == [] and result.received_sha == result.sent_sha
    with pytest.raises(UsageError, match="--max-frame must be at least"):
        server_tap.Options().parseOptions(
            ["--no-tls", "--psk-file", keys.psk, "--max-frame", str(MIN_MAX_FRAME_KIB - 1)]
        )


def vm_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory figure (VmRSS, VmHWM), KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


# What the server may add to its footprint here: one session's receive window
# (32 MiB by default) and send buffers, plus a bounded cost per connection
# still authenticating (at most --max-handshakes of them).
FLOOD_MEMORY_MIB = 64


@pytest_twisted.ensureDeferred
async def test_server_process_keeps_its_memory_bound_under_a_flood(
    cleanup: Cleanup, keys: Keys, tmp_path: Path
) -> None:
    """A real ``twistd stripe-server`` process: 300 slowloris connections (more
    than --max-handshakes) and 1,000 garbage connections while a 64 MiB echo
    runs through it.  The echo is bit-exact, the flood is refused with one log
    line, and the process's peak RSS stays within a fixed bound."""
    target = await start_target(cleanup, EchoFactory())
    # 24 slots in all: below the per-address share (32), so the flood, which
    # comes from one address like everything here, meets the global limit.
    options = ["--handshake-timeout", "2", "--max-handshakes", "24"]
    instance = await start_instance(cleanup, keys, "server", tmp_path, options)
    pid = instance.process.popen.pid
    client = await start_client(cleanup, keys, instance.port, True, k=4)
    await wait_for(
        lambda: client.driver is not None and len(client.driver.subflows) == 4, "4 subflows"
    )
    baseline = vm_kib(pid, "VmRSS")
    transfer = in_thread(socks_echo, client.socks_port, target.port, 64 * MiB, 5)
    lorises = await in_thread(open_slowloris, [instance.port], 300)
    garbage = [in_thread(throw_garbage, [instance.port], 500, seed) for seed in (3, 4)]
    for d in garbage:
        await d
    result = await transfer
    assert result.errors == []
    assert result.received == 64 * MiB and result.received_sha == result.sent_sha
    await instance.process.wait_for("refusing new connections until some finish")
    await wait_for(
        lambda: all(closed_by_peer(s) for s in lorises), "slowloris connections to be closed"
    )
    for s in lorises:
        s.close()
    assert client.driver is not None and len(client.driver.subflows) == 4
    grown = (vm_kib(pid, "VmHWM") - baseline) / 1024
    print(f"\nserver process peak RSS {grown:.1f} MiB above its idle session")
    assert grown < FLOOD_MEMORY_MIB, f"peak RSS grew by {grown:.1f} MiB"
    assert "Traceback" not in instance.process.output()


def rejected_but_lingering(port: int) -> ssl.SSLSocket:
    """Complete TLS, send an AUTH of an unknown version, read the REJECT and
    keep the connection open (never answering the server's close)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    s = context.wrap_socket(raw)
    decoder = wire.FrameDecoder(crc=False)
    assert isinstance(next_frame(s, decoder), wire.Challenge)
    auth = wire.Auth(99, b"\0" * 32, b"\0" * 16, 0, "", b"\0" * 32)
    s.sendall(wire.encode_auth(auth, False))
    assert isinstance(next_frame(s, decoder), wire.Reject)
    return s


@pytest_twisted.ensureDeferred
async def test_a_rejected_peer_that_lingers_frees_its_handshake_slot(
    cleanup: Cleanup, keys: Keys
) -> None:
    """With room for one handshake, a peer that got its REJECT but keeps the
    socket open must not lock everybody else out."""
    # A long handshake timeout: the slot must come back at the REJECT, not then.
    options = ["--max-handshakes", "1", "--handshake-timeout", "60"]
    server = await start_server(cleanup, keys, True, options)
    lingering = await in_thread(rejected_but_lingering, server.port)
    try:
        client = await start_client(cleanup, keys, server.port, True, k=1)
        await wait_for(
            lambda: client.driver is not None and len(client.driver.subflows) == 1,
            "a subflow while the rejected peer lingers",
        )
    finally:
        lingering.close()


def challenged(source: str, port: int) -> bool:
    """Connect from ``source``; True if the server sends its CHALLENGE."""
    address = ("127.0.0.1", port)
    try:
        # An abort on accept can reset the connection before connect() returns.
        with socket.create_connection(address, SOCKET_TIMEOUT, (source, 0)) as s:
            return isinstance(next_frame(s, wire.FrameDecoder(crc=True)), wire.Challenge)
    except ConnectionError:  # closed or reset without one
        return False


@pytest_twisted.ensureDeferred
async def test_one_address_gets_only_its_share_of_the_handshake_pool(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    """--subflows 1 and --max-handshakes 16 give each address 2 slots: a third
    silent connection from the same address is closed at once, while another
    address still gets its CHALLENGE."""
    options = ["--subflows", "1", "--max-handshakes", "16", "--handshake-timeout", "60"]
    server = await start_server(cleanup, keys, False, options)
    held = []
    for _ in range(2):
        s = await in_thread(socket.create_connection, ("127.0.0.1", server.port), SOCKET_TIMEOUT)
        held.append(s)
    try:
        await wait_for(lambda: server.registry.handshaking == 2, "two handshakes under way")
        assert not await in_thread(challenged, "127.0.0.1", server.port)
        assert await in_thread(challenged, "127.0.0.2", server.port)
        assert any("127.0.0.1 has 2 subflows authenticating at once" in m for m in log_messages)
    finally:
        for s in held:
            s.close()
