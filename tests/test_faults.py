"""Fault injection: subflows reset, black-holed, throttled, corrupted; server restarts.

Topology: echo target <- stripe-server <- FaultRelay <- stripe-client, every
piece in this process on real loopback sockets (see tests/helpers.py).  The
client's ``--server`` is the relay, so each subflow is one relay
:class:`~stripeproxy.testing.faults.Link` that the test can break on purpose while a
64 MiB transfer runs in a thread.  Faults fire from the reactor once the
transfer is under way (the relay's byte counters say when), never after a
fixed sleep.  Times are printed (``-s``) for information only: nothing here
asserts a wall time.
"""

from __future__ import annotations

import hashlib
import random
import socket
import time
from dataclasses import dataclass

import pytest
import pytest_twisted
from helpers import (
    SOCKET_TIMEOUT,
    CountingFactory,
    DigestSink,
    DigestSinkFactory,
    DownloadFactory,
    EchoFactory,
    KiB,
    MiB,
    Pair,
    Target,
    Transfer,
    echo_roundtrip,
    in_thread,
    read_all,
    sleep,
    socks_connect,
    socks_echo,
    start_client,
    start_relay,
    start_server,
    start_target,
    throughput,
    wait_for,
)
from twisted.internet import defer

from stripeproxy.net.driver import SessionDriver
from stripeproxy.testing.faults import FaultRelay, Link

MODES = [pytest.param(True, id="tls"), pytest.param(False, id="plain")]
K = 4
SIZE = 64 * MiB
# Fast recovery: heartbeats every 0.5 s, a silent subflow is dead after 2 s,
# a session outlives its last subflow by 10 s, re-dials wait at most ~2 s.
SERVER_OPTIONS = ["--heartbeat", "0.5", "--dead-interval", "2", "--grace", "10"]
CLIENT_OPTIONS = [*SERVER_OPTIONS, "--retry-max", "1"]
# Generous: the machine is shared, and recovery includes a re-dial with backoff.
RECOVERY = 45.0


def mode(tls: bool) -> str:
    return "tls" if tls else "plain"


def check_echo(result: Transfer, size: int = SIZE) -> None:
    assert result.errors == []
    assert result.sent == size
    assert result.received == size
    assert result.received_sha == result.sent_sha


# ------------------------------------------------------------------ the rig


@dataclass
class Rig:
    pair: Pair
    relay: FaultRelay
    relay_port: int
    target: Target

    @property
    def socks_port(self) -> int:
        return self.pair.socks_port


async def start_rig(cleanup, keys, tls: bool, factory: CountingFactory | None = None) -> Rig:
    """Target, server, relay in front of the server, client through the relay."""
    target = await start_target(cleanup, factory or EchoFactory())
    server = await start_server(cleanup, keys, tls, SERVER_OPTIONS)
    relay, relay_port = await start_relay(cleanup, "127.0.0.1", server.port)
    client = await start_client(cleanup, keys, relay_port, tls, K, CLIENT_OPTIONS)
    pair = Pair(server, client, tls)
    await pair.wait_established()
    assert len(relay.live()) == K
    return Rig(pair, relay, relay_port, target)


async def under_way(
    relay: FaultRelay, transfer: defer.Deferred, nbytes: int, both_ways: bool = False
) -> None:
    """Wait until ``nbytes`` more went up (or either way) through the relay."""

    def count() -> int:
        return relay.passed() if both_ways else relay.passed_up()

    start = count()
    await wait_for(
        lambda: count() - start >= nbytes or transfer.called,
        f"{nbytes} bytes to pass the relay",
        timeout=60,
    )
    assert not transfer.called, "the transfer finished before the fault could be injected"


def lost(driver: SessionDriver) -> int:
    return driver.counters()["subflows_lost"]


async def wait_recovered(rig: Rig) -> None:
    """Back to K subflows on both sides, one session, and no stream left over."""
    pair = rig.pair
    await pair.wait_established(timeout=RECOVERY)
    await wait_for(
        lambda: not pair.client_driver().stream_count and not pair.server_driver().stream_count,
        "both sessions to forget the finished streams",
        timeout=RECOVERY,
    )
    await wait_for(lambda: len(rig.relay.live()) == K, f"{K} live relay links", RECOVERY)


def subflow_of(driver: SessionDriver, link: Link) -> int | None:
    """The session's subflow id that runs through ``link`` (matched by TCP port)."""
    for sid, subflow in driver.subflows.items():
        transport = subflow.transport
        if transport is None:
            continue
        if driver.is_client:
            port = transport.getHost().port
            if port == link.client_port():
                return sid
        elif transport.getPeer().port == link.server_port():
            return sid
    return None


def report(what: str, tls: bool, result: Transfer, rig: Rig) -> None:
    client, server = rig.pair.client_driver(), rig.pair.server_driver()
    cc, sc = client.counters(), server.counters()
    print(
        f"\n{what} {mode(tls)}: {throughput(SIZE, result.seconds)} each way; "
        f"lost client/server {cc['subflows_lost']}/{sc['subflows_lost']}, "
        f"retransmitted {cc['retransmitted'] / MiB:.1f}/{sc['retransmitted'] / MiB:.1f} MiB, "
        f"reinjected {cc['reinjected'] / MiB:.1f}/{sc['reinjected'] / MiB:.1f} MiB, "
        f"timeouts {cc['timeouts']}/{sc['timeouts']}"
    )


# -------------------------------------------------- the relay on its own


def echo_through(port: int, size: int) -> Transfer:
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    return echo_roundtrip(sock, size)


def recv_error(port: int) -> str:
    """Connect, wait for the relay to break the connection; what did we see?"""
    try:
        # On loopback the RST of a refused connection can beat connect() itself.
        sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    except ConnectionResetError:
        return "reset"
    try:
        data = sock.recv(1)
        return "eof" if not data else "data"
    except ConnectionResetError:
        return "reset"
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_relay_passes_delays_and_throttles_bytes_in_order(cleanup):
    """The relay itself: bytes arrive unchanged and in order under delay and throttle."""
    target = await start_target(cleanup, EchoFactory())
    relay, port = await start_relay(cleanup, "127.0.0.1", target.port)
    check_echo(await in_thread(echo_through, port, 16 * MiB), 16 * MiB)
    (link,) = relay.links
    assert link.up.passed == link.down.passed == 16 * MiB
    await wait_for(lambda: link.closed, "the link to close after the echo")

    # Delay, then remove it while bytes are still held: TCP order is kept.
    sock = await in_thread(socket.create_connection, ("127.0.0.1", port), SOCKET_TIMEOUT)
    await wait_for(lambda: len(relay.live()) == 1, "the second link")
    (link,) = relay.live()
    link.set_delay(0.3)
    first = random.Random(2).randbytes(512 * KiB)
    second = random.Random(3).randbytes(512 * KiB)
    sender = in_thread(sock.sendall, first)
    await wait_for(lambda: link.up.passed >= 256 * KiB, "delayed bytes to be held")
    link.set_delay(0)
    await sender
    await in_thread(sock.sendall, second)
    sock.shutdown(socket.SHUT_WR)
    assert await in_thread(read_all, sock) == first + second

    # Throttle: 256 KiB/s each way, so 256 KiB takes about a second.
    sock = await in_thread(socket.create_connection, ("127.0.0.1", port), SOCKET_TIMEOUT)
    await wait_for(lambda: len(relay.live()) == 1, "the third link")
    (link,) = relay.live()
    link.throttle(256 * KiB)
    started = time.monotonic()
    data = random.Random(4).randbytes(256 * KiB)
    await in_thread(sock.sendall, data)
    sock.shutdown(socket.SHUT_WR)
    assert await in_thread(read_all, sock) == data
    print(f"\n256 KiB through a 256 KiB/s link, echoed: {time.monotonic() - started:.2f} s")


@pytest_twisted.ensureDeferred
async def test_relay_faults_reset_refuse_flip_and_blackhole(cleanup):
    target = await start_target(cleanup, EchoFactory())
    relay, port = await start_relay(cleanup, "127.0.0.1", target.port)

    # reset(): the client sees an RST, the target's connection goes too.
    seen = in_thread(recv_error, port)
    await wait_for(lambda: len(relay.live()) == 1, "a live link")
    relay.live()[0].reset()
    assert await seen == "reset"
    await wait_for(lambda: not target.factory.live, "the target's side to close")

    # refuse: new connections are reset at once, and nothing reaches the target.
    relay.refuse = True
    assert await in_thread(recv_error, port) == "reset"
    assert relay.refused == 1
    assert target.factory.connections == 1
    relay.refuse = False

    # flip_byte(): exactly one byte differs, at the chosen position.
    sock = await in_thread(socket.create_connection, ("127.0.0.1", port), SOCKET_TIMEOUT)
    await wait_for(lambda: len(relay.live()) == 1, "a live link")
    (link,) = relay.live()
    link.flip_byte(1000, upstream=True)
    link.flip_byte(5000, upstream=False)
    payload = random.Random(5).randbytes(64 * KiB)
    await in_thread(sock.sendall, payload)
    sock.shutdown(socket.SHUT_WR)
    echoed = await in_thread(read_all, sock)
    diff = [i for i in range(len(payload)) if payload[i] != echoed[i]]
    assert diff == [1000, 5000]

    # blackhole(): nothing passes either way, and a close does not cross it.
    sock = await in_thread(socket.create_connection, ("127.0.0.1", port), SOCKET_TIMEOUT)
    await wait_for(lambda: len(relay.live()) == 1, "a live link")
    (link,) = relay.live()
    link.blackhole()
    await in_thread(sock.sendall, b"x" * 100_000)
    await wait_for(lambda: link.up.dropped == 100_000, "the black hole to swallow the bytes")
    assert link.up.passed == 0
    sock.close()
    await wait_for(lambda: link.client_end.gone, "the relay to see the close")
    await sleep(0.2)
    assert not link.server_end.gone  # the target was told nothing
    link.reset()
    await wait_for(lambda: link.server_end.gone, "the target's side to be reset")


# ------------------------------------------------------------ 1. one reset


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_reset_one_subflow(cleanup, keys, tls):
    rig = await start_rig(cleanup, keys, tls)
    client, server = rig.pair.client_driver(), rig.pair.server_driver()
    transfer = in_thread(socks_echo, rig.socks_port, rig.target.port, SIZE, 1)
    await under_way(rig.relay, transfer, 16 * MiB)
    victim = rig.relay.live()[0]
    victim.reset()
    result = await transfer
    report("one subflow reset", tls, result, rig)
    check_echo(result)
    await wait_recovered(rig)
    assert rig.pair.client_driver() is client and rig.pair.server_driver() is server
    assert lost(client) >= 1 and lost(server) >= 1
    assert victim not in rig.relay.live()


# ------------------------------------------------------- 2. K-1 resets at once


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_reset_all_but_one_subflow(cleanup, keys, tls):
    rig = await start_rig(cleanup, keys, tls)
    client, server = rig.pair.client_driver(), rig.pair.server_driver()
    transfer = in_thread(socks_echo, rig.socks_port, rig.target.port, SIZE, 2)
    await under_way(rig.relay, transfer, 16 * MiB)
    for link in rig.relay.live()[: K - 1]:
        link.reset()
    result = await transfer
    report(f"{K - 1} of {K} subflows reset", tls, result, rig)
    check_echo(result)
    await wait_recovered(rig)
    assert rig.pair.client_driver() is client and rig.pair.server_driver() is server
    assert lost(client) >= K - 1 and lost(server) >= K - 1


# ------------------------------------------- 3. every subflow gone for 2 s


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_all_subflows_gone_shorter_than_grace(cleanup, keys, tls):
    rig = await start_rig(cleanup, keys, tls)
    relay = rig.relay
    client, server = rig.pair.client_driver(), rig.pair.server_driver()
    session_id = server.session_id
    transfer = in_thread(socks_echo, rig.socks_port, rig.target.port, SIZE, 3)
    await under_way(relay, transfer, 16 * MiB)
    relay.refuse = True
    for link in relay.live():
        link.reset()
    outage = time.monotonic()
    await wait_for(lambda: not client.subflows and not server.subflows, "every subflow to go")
    await sleep(2.0)
    relay.refuse = False
    outage = time.monotonic() - outage
    assert relay.refused >= 1, "the client did not re-dial during the outage"
    result = await transfer
    report(f"all subflows gone for {outage:.1f} s", tls, result, rig)
    check_echo(result)
    await wait_recovered(rig)
    # The same session on both sides: its streams resumed, nothing was reset.
    assert rig.pair.client_driver() is client
    assert list(rig.pair.server.registry.sessions.values()) == [server]
    assert server.session_id == session_id and not server.closed
    assert lost(client) >= K and lost(server) >= K


# ------------------------------------------------------- 4. a black hole


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_black_holed_subflow(cleanup, keys, tls, log_messages):
    rig = await start_rig(cleanup, keys, tls)
    client, server = rig.pair.client_driver(), rig.pair.server_driver()
    transfer = in_thread(socks_echo, rig.socks_port, rig.target.port, SIZE, 4)
    await under_way(rig.relay, transfer, 16 * MiB)
    victim = rig.relay.live()[0]
    client_sid, server_sid = subflow_of(client, victim), subflow_of(server, victim)
    assert client_sid is not None and server_sid is not None
    victim.blackhole()
    result = await transfer
    report("one subflow black-holed", tls, result, rig)
    check_echo(result)
    # Each side drops it on its own after the dead interval (the relay passes
    # no close through a black hole), and the client dials a replacement.
    await wait_for(
        lambda: victim.client_end.gone and victim.server_end.gone,
        "both sides to drop the black-holed subflow",
        RECOVERY,
    )
    await wait_recovered(rig)
    assert client_sid not in client.subflows and server_sid not in server.subflows
    silent = [m for m in log_messages if "silent for 2 s" in m]
    assert any(f"dropping subflow {client_sid}:" in m for m in silent), silent
    assert any(f"dropping subflow {server_sid}:" in m for m in silent), silent
    assert lost(client) >= 1 and lost(server) >= 1
    print(
        f"black hole swallowed {victim.up.dropped / MiB:.1f} MiB up, "
        f"{victim.down.dropped / MiB:.1f} MiB down"
    )


# ------------------------------------------------------- 5. a slow subflow


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_one_slow_subflow(cleanup, keys, tls):
    rig = await start_rig(cleanup, keys, tls)
    relay = rig.relay
    client, server = rig.pair.client_driver(), rig.pair.server_driver()
    before = relay.passed_up()
    baseline = await in_thread(socks_echo, rig.socks_port, rig.target.port, SIZE, 5)
    check_echo(baseline)
    # What one link carried per second upwards, on average, in the baseline.
    per_link = (relay.passed_up() - before) / baseline.seconds / K
    rate = max(per_link / 20, 64 * KiB)
    await wait_recovered(rig)

    def shares() -> dict[str, dict[int, int]]:
        return {
            "client": {s: client.session.subflow(s).tx_real for s in client.session.subflow_ids},
            "server": {s: server.session.subflow(s).tx_real for s in server.session.subflow_ids},
        }

    start = shares()
    transfer = in_thread(socks_echo, rig.socks_port, rig.target.port, SIZE, 6)
    await under_way(relay, transfer, 4 * MiB)
    slow = relay.live()[0]
    sids = {"client": subflow_of(client, slow), "server": subflow_of(server, slow)}
    slow.throttle(rate)
    result = await transfer
    end = shares()
    slow.throttle(None)
    report("one subflow throttled", tls, result, rig)
    check_echo(result)
    print(
        f"baseline {throughput(SIZE, baseline.seconds)}; one link throttled to "
        f"{rate / KiB:.0f} KiB/s (1/20 of {per_link / MiB:.1f} MiB/s): "
        f"{throughput(SIZE, result.seconds)}"
    )
    for side, sid in sids.items():
        sent = {s: end[side][s] - start[side].get(s, 0) for s in end[side]}
        total = sum(sent.values())
        share = sent.get(sid, 0) / total if sid is not None else 0.0
        print(f"{side}: the slow subflow {sid} carried {100 * share:.1f}% of {total / MiB:.0f} MiB")
        assert share < 0.5 / K, f"{side}: the slow subflow carried {100 * share:.1f}%"


# --------------------------------------------------- 6. a corrupted byte


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_corrupted_byte_drops_the_subflow(cleanup, keys, tls, log_messages):
    """Plaintext: CRC32C mismatch; TLS: a bad record MAC.  Either way the subflow goes."""
    rig = await start_rig(cleanup, keys, tls)
    client, server = rig.pair.client_driver(), rig.pair.server_driver()
    transfer = in_thread(socks_echo, rig.socks_port, rig.target.port, SIZE, 7)
    await under_way(rig.relay, transfer, 16 * MiB)
    up_link, down_link = rig.relay.live()[:2]
    # How each side names the subflow in its log: the server sees the relay's
    # outgoing port, the client the relay's listening port.
    server_peer = f"subflow 127.0.0.1:{up_link.server_port()}:"
    client_peer = f"subflow 127.0.0.1:{rig.relay_port}:"
    up_link.flip_byte(1000, upstream=True)  # the server must catch it
    down_link.flip_byte(1000, upstream=False)  # the client must catch it
    result = await transfer
    report("one byte flipped each way", tls, result, rig)
    check_echo(result)  # nothing corrupt was delivered
    assert up_link.up.flipped is not None and down_link.down.flipped is not None
    await wait_for(lambda: up_link.closed and down_link.closed, "both links to drop", RECOVERY)
    assert not up_link.was_reset and not down_link.was_reset
    await wait_recovered(rig)
    assert lost(client) >= 1 and lost(server) >= 1
    # Dropped because of the corruption, on both sides, not left to linger
    # until the dead interval (with TLS it did, whenever the TCP transport's
    # buffer was full at the time of the TLS error: see SubflowProtocol.resumeProducing).
    silent = [m for m in log_messages if "silent for" in m]
    assert silent == []
    if not tls:
        reasons = [m for m in log_messages if m.startswith("subflow 127.0.0.1:")]
        print("\n".join(reasons))
        # A flipped byte almost always lands in a DATA payload (CRC32C mismatch);
        # in a frame header it is another protocol error.  Either way it is logged.
        assert any(m.startswith(server_peer) for m in reasons), (server_peer, reasons)
        assert any(m.startswith(client_peer) for m in reasons), (client_peer, reasons)


# --------------------------------------------------- 7. server restart


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_server_restart_mid_transfer(cleanup, keys, tls, log_messages):
    rig = await start_rig(cleanup, keys, tls)
    pair = rig.pair
    old = pair.client_driver()
    transfer = in_thread(socks_echo, rig.socks_port, rig.target.port, SIZE, 8)
    await under_way(rig.relay, transfer, 16 * MiB)
    await pair.server.stop()
    listen = f"tcp:{pair.server.port}:interface=127.0.0.1"
    pair.server = await start_server(cleanup, keys, tls, SERVER_OPTIONS, listen=listen)
    result = await transfer  # the old stream ends without its data, and without a hang
    print(
        f"\nserver restart {mode(tls)}: the SOCKS client saw {result.errors or 'EOF'} "
        f"after {result.received / MiB:.1f} MiB, {result.seconds:.2f} s"
    )
    assert result.received < SIZE
    assert not any("timed out" in e for e in result.errors), result.errors
    await pair.wait_established(timeout=RECOVERY)
    assert pair.client_driver() is not old and old.closed
    assert any("unknown session" in m for m in log_messages)
    again = await in_thread(socks_echo, rig.socks_port, rig.target.port, SIZE, 9)
    print(f"after the restart: {throughput(SIZE, again.seconds)} each way")
    check_echo(again)
    await wait_recovered(rig)


# ---------------------------------- 8. both directions, a reset every second


def upload(socks_port: int, target_port: int, size: int, seed: int) -> tuple[bytes, bytes]:
    """Send ``size`` random bytes and half-close; (the sink's answer, what it should be)."""
    sock = socks_connect(socks_port, "127.0.0.1", target_port)
    rng = random.Random(seed)
    digest = hashlib.sha256()
    left = size
    while left:
        block = rng.randbytes(min(256 * KiB, left))
        digest.update(block)
        sock.sendall(block)
        left -= len(block)
    sock.shutdown(socket.SHUT_WR)
    return read_all(sock), f"{size} {digest.hexdigest()}".encode()


def download(socks_port: int, target_port: int) -> bytes:
    return read_all(socks_connect(socks_port, "127.0.0.1", target_port))


async def both_ways(rig: Rig, sink: Target, source: Target, seed: int) -> float:
    """One upload and one download of SIZE at once, both checked; returns the seconds."""
    started = time.monotonic()
    up = in_thread(upload, rig.socks_port, sink.port, SIZE, seed)
    down = in_thread(download, rig.socks_port, source.port)
    answer, expected = await up
    data = await down
    seconds = time.monotonic() - started
    assert answer == expected
    assert len(data) == SIZE + 32
    assert hashlib.sha256(data[:-32]).digest() == data[-32:] == source.factory.digest
    return seconds


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_a_reset_every_second_both_directions(cleanup, keys, tls):
    """An upload and a download at once while a subflow is reset every second for ~5 s.

    A round moves SIZE each way; rounds follow each other until five resets
    have happened, so the throughput under faults covers the whole period.
    """
    rig = await start_rig(cleanup, keys, tls, DigestSinkFactory())
    sink = rig.target
    source = await start_target(cleanup, DownloadFactory(SIZE, seed=8))
    client, server = rig.pair.client_driver(), rig.pair.server_driver()

    clean = await both_ways(rig, sink, source, 10)
    await wait_recovered(rig)

    kills: list[float] = []

    async def killer() -> None:
        for _ in range(5):
            await sleep(1.0)
            # A subflow of the session, not a re-dial still in its handshake;
            # the oldest one, so that every subflow gets its turn.
            joined = [link for link in rig.relay.live() if subflow_of(client, link) is not None]
            if joined:
                joined[0].reset()
                kills.append(time.monotonic())

    started = time.monotonic()
    rounds = 0
    first = defer.ensureDeferred(both_ways(rig, sink, source, 11))
    await under_way(rig.relay, first, 4 * MiB)
    killing = defer.ensureDeferred(killer())
    await first
    rounds += 1
    while not killing.called:
        await both_ways(rig, sink, source, 11 + rounds)
        rounds += 1
    await killing
    faulty = time.monotonic() - started
    moved = 2 * SIZE * rounds
    print(
        f"\nboth ways at once ({SIZE / MiB:.0f} MiB up + {SIZE / MiB:.0f} MiB down a round) "
        f"{mode(tls)}, K={K}: no faults {2 * SIZE / MiB:.0f} MiB in {clean:.2f} s "
        f"= {2 * SIZE / MiB / clean:.1f} MiB/s; a subflow reset every second "
        f"({len(kills)} resets): {moved / MiB:.0f} MiB in {rounds} rounds, {faulty:.2f} s "
        f"= {moved / MiB / faulty:.1f} MiB/s"
    )
    assert len(kills) == 5
    await wait_recovered(rig)
    assert rig.pair.client_driver() is client and rig.pair.server_driver() is server
    assert lost(client) >= 5 and lost(server) >= 5


# ------------------------------------------------ a black hole on the ACK path


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_black_hole_on_the_ack_path(cleanup, keys, tls):
    """A download: the client sends only ACKs.  Black-hole the subflow that carries them.

    SPEC.md section 6: a chunk unacknowledged past the RTO is sent again on
    another subflow, and a timeout makes each side repeat its ACKs, so the
    download must finish by retransmission, while the black-holed subflow is
    still attached (the dead interval here is 5 s, far longer than the
    download takes).  This needs the receive-only side to spread its ACKs
    over its subflows: it never times anything out, so it cannot learn on
    its own that one subflow swallows them.
    """
    options = ["--heartbeat", "0.5", "--dead-interval", "5", "--grace", "10"]
    target = await start_target(cleanup, DownloadFactory(SIZE, seed=12))
    server = await start_server(cleanup, keys, tls, options)
    relay, relay_port = await start_relay(cleanup, "127.0.0.1", server.port)
    client = await start_client(cleanup, keys, relay_port, tls, K, [*options, "--retry-max", "1"])
    pair = Pair(server, client, tls)
    await pair.wait_established()
    client_driver, server_driver = pair.client_driver(), pair.server_driver()
    transfer = in_thread(download, pair.socks_port, target.port)
    await under_way(relay, transfer, 8 * MiB, both_ways=True)
    # The ACK path: the link that carries the most bytes upwards right now.
    before = {link: link.up.passed for link in relay.live()}
    await sleep(0.1)
    victim = max(before, key=lambda link: link.up.passed - before[link])
    assert not transfer.called, "the download finished before the fault could be injected"
    victim.blackhole()
    started = time.monotonic()
    data = await transfer
    seconds = time.monotonic() - started
    counters = server_driver.counters()
    print(
        f"\nACK path black-holed {mode(tls)}: the download ended {seconds:.2f} s later; "
        f"subflows lost client/server {lost(client_driver)}/{lost(server_driver)}; server "
        f"timeouts {counters['timeouts']}, retransmitted {counters['retransmitted'] / MiB:.1f} MiB"
    )
    assert len(data) == SIZE + 32
    assert hashlib.sha256(data[:-32]).digest() == data[-32:] == target.factory.digest
    assert lost(client_driver) == 0, "the download waited for the dead interval"


# ------------------------------------- failover: a black hole at a 50 ms RTT


class GapSink(DigestSink):
    """A digest sink that also notes the longest pause between arrivals since
    its factory's ``since`` (for the report only: nothing asserts a wall time)."""

    factory: GapSinkFactory

    def dataReceived(self, data: bytes) -> None:
        now = time.monotonic()
        factory = self.factory
        if factory.since is not None:
            factory.longest = max(factory.longest, now - max(factory.last, factory.since))
        factory.last = now
        super().dataReceived(data)


class GapSinkFactory(CountingFactory):
    protocol = GapSink

    def __init__(self) -> None:
        super().__init__()
        self.since: float | None = None
        self.last = 0.0
        self.longest = 0.0


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_black_hole_fails_over_before_the_dead_interval(cleanup, keys, tls):
    """Every link 25 ms each way; the busiest one black-holes mid-upload.

    SPEC.md section 6: the chunk that times out there, and every chunk behind
    it, go on the other subflows at once, and the suspect subflow gets no new
    chunk; the upload completes bit-exact long before the 30 s dead interval
    would have noticed (no subflow is lost on either side).
    """
    options = ["--heartbeat", "1", "--dead-interval", "30", "--grace", "10"]
    sink = GapSinkFactory()
    target = await start_target(cleanup, sink)
    server = await start_server(cleanup, keys, tls, options)
    relay, relay_port = await start_relay(cleanup, "127.0.0.1", server.port)
    client = await start_client(cleanup, keys, relay_port, tls, K, [*options, "--retry-max", "1"])
    pair = Pair(server, client, tls)
    await pair.wait_established()
    for link in relay.live():
        link.set_delay(0.025)
    client_driver, server_driver = pair.client_driver(), pair.server_driver()
    transfer = in_thread(upload, pair.socks_port, target.port, SIZE, 13)
    await under_way(relay, transfer, 8 * MiB)
    before = {link: link.up.passed for link in relay.live()}
    await sleep(0.2)
    victim = max(before, key=lambda link: link.up.passed - before[link])
    assert not transfer.called, "the upload finished before the fault could be injected"
    victim.blackhole()
    sink.since = time.monotonic()
    answer, expected = await transfer
    counters = client_driver.counters()
    print(
        f"\nblack hole at 50 ms RTT {mode(tls)}: longest pause at the target "
        f"{sink.longest:.2f} s (wall, loaded machine); client timeouts {counters['timeouts']}, "
        f"re-queued {counters['requeued_timeout'] / MiB:.1f} MiB by timeouts, "
        f"{counters['reinjected'] / MiB:.1f} MiB re-injected; "
        f"swallowed {victim.up.dropped / MiB:.1f} MiB up"
    )
    assert answer == expected
    assert victim.up.dropped > 0
    assert counters["timeouts"] >= 1 and counters["requeued_timeout"] > 0
    assert lost(client_driver) == 0 and lost(server_driver) == 0, "waited for the dead interval"
