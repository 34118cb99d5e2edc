"""Hostile input: garbage and slowloris on both ports during a real transfer,
and random frames thrown at the session core."""

from __future__ import annotations

import random
import resource
import socket

import pytest_twisted
from helpers import (
    Cleanup,
    EchoFactory,
    Keys,
    in_thread,
    socks_echo,
    start_pair,
    start_target,
    wait_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stripeproxy import wire
from stripeproxy.session import MiB
from stripeproxy.testing import C2S, CLIENT, S2C, SessionPair

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
    """Connections that send one byte and then nothing at all."""
    socks = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", ports[i % len(ports)]), timeout=5)
        s.sendall(b"\x05")
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
        pair.inject(alive[0], direction, [frame])  # type: ignore[arg-type]
        pair.deliver_all()
    pair.shutdown()
