"""One session over several paths, on loopback sockets (README, Bonding).

Linux routes all of 127.0.0.0/8 to ``lo``, so a client can leave from
127.0.0.1 and 127.0.0.2 like a host with two uplinks; the server sees where
each subflow comes from.  Data is checked with hashes both ways.  The pool
of a path grows and shrinks under a scripted K controller while a transfer
runs, and nothing is lost.
"""

from __future__ import annotations

import hashlib
import random
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from helpers import (
    SOCKET_TIMEOUT,
    Cleanup,
    EchoFactory,
    Keys,
    KiB,
    MiB,
    in_thread,
    sleep,
    socks_connect,
    socks_echo,
    start_client,
    start_server,
    start_target,
    wait_for,
)

from stripeproxy.cli import client_tap
from stripeproxy.net.paths import PathPool
from stripeproxy.ops.observe import Monitor

MODES = [pytest.param(True, id="tls"), pytest.param(False, id="plaintext")]


def _server_sources(server: Any) -> Counter[str]:
    """How many of the server's subflows come from each source address."""
    return Counter(
        subflow.peer.rsplit(":", 1)[0]
        for driver in server.sessions
        for subflow in driver.subflows.values()
    )


def _pools(client: Any) -> list[PathPool]:
    found: list[PathPool] = []
    for service in client.service:
        for child in getattr(service, "services", []):
            if isinstance(child, PathPool):
                found.append(child)
    return found


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_two_paths_carry_one_session(cleanup: Cleanup, keys: Keys, tls: bool) -> None:
    target = await start_target(cleanup, EchoFactory())
    server = await start_server(cleanup, keys, tls)
    # "one" is an interface (lo: resolved at every dial, to 127.0.0.1), "two" an address.
    paths = ["--path", "one=lo:2", "--path", "two=127.0.0.2:3"]
    client = await start_client(cleanup, keys, server.port, tls, 2, paths)
    await wait_for(
        lambda: len(server.sessions) == 1 and _server_sources(server).total() == 5,
        "five subflows from two sources",
    )
    assert _server_sources(server) == {"127.0.0.1": 2, "127.0.0.2": 3}
    size = 24 * MiB
    result = await in_thread(socks_echo, client.socks_port, target.port, size)
    assert result.errors == []
    assert result.sent == result.received == size
    assert result.sent_sha == result.received_sha
    # Both paths carried payload, both ways, and the views know which is which.
    (driver,) = server.sessions
    by_source: Counter[str] = Counter()
    for sid in driver.session.subflow_ids:
        state = driver.session.subflow(sid)
        by_source[driver.subflows[sid].peer.rsplit(":", 1)[0]] += state.tx_real + state.rx_real
    assert set(by_source) == {"127.0.0.1", "127.0.0.2"}
    assert all(by_source.values())
    monitor = Monitor(
        "client",
        client.overlay.clock,
        lambda: [client.driver] if client.driver is not None else [],
        dials=lambda: [s.slot.status() for p in _pools(client) for s in p.slots],
        paths=lambda: [p.status() for p in _pools(client)],
    )
    snapshot = monitor.sample()
    assert Counter(row.path for row in snapshot.subflows) == {"one": 2, "two": 3}
    assert [(p.name, p.state, p.open, p.target) for p in snapshot.paths] == [
        ("one", "up", 2, 2),
        ("two", "up", 3, 3),
    ]
    assert {p.address for p in snapshot.paths} == {"127.0.0.1", "127.0.0.2"}
    # The interface's address did not change: its watch (every second) closed nothing.
    await sleep(1.5)
    assert [s.slot.joins for p in _pools(client) for s in p.slots] == [1] * 5


# ---------------------------------------------------------- a scripted K


@dataclass(frozen=True)
class Decision:
    target: int
    reason: str


class ScriptedController:
    """A K controller that says what the test pushes into ``script``."""

    made: list[ScriptedController] = []

    def __init__(self, k_min: int, k_max: int, k_start: int) -> None:
        self.k_min, self.k_max, self._target = k_min, k_max, k_start
        self.script: list[int] = []
        self.reason = "start"
        self.seen: list[tuple[int, float, bool, bool]] = []
        ScriptedController.made.append(self)

    @property
    def target(self) -> int:
        return self._target

    def observe(
        self, now: float, k_open: int, goodput_bps: float, busy: bool, loss_limited: bool
    ) -> Decision | None:
        self.seen.append((k_open, goodput_bps, busy, loss_limited))
        if not self.script:
            return None
        self._target = self.script.pop(0)
        self.reason = f"scripted {self._target}"
        return Decision(self._target, self.reason)


def paced_echo(sock: socket.socket, stop: threading.Event) -> tuple[int, str, int, str]:
    """Send random 64 KiB blocks until ``stop``, half-close, read the echo to EOF."""
    rng = random.Random(5)
    sent, got = hashlib.sha256(), hashlib.sha256()
    counts = [0, 0]

    def send() -> None:
        while not stop.wait(0.002):
            block = rng.randbytes(64 * KiB)
            sent.update(block)
            sock.sendall(block)
            counts[0] += len(block)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    while data := sock.recv(256 * KiB):
        got.update(data)
        counts[1] += len(data)
    sender.join(SOCKET_TIMEOUT)
    sock.close()
    return counts[0], sent.hexdigest(), counts[1], got.hexdigest()


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_the_pool_grows_and_shrinks_without_losing_data(
    cleanup: Cleanup, keys: Keys, tls: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_tap, "KController", ScriptedController)
    ScriptedController.made.clear()
    target = await start_target(cleanup, EchoFactory())
    server = await start_server(cleanup, keys, tls)
    argv = ["--path", "one=127.0.0.1", "--path", "two=127.0.0.2:2", "--subflows-max", "8"]
    client = await start_client(cleanup, keys, server.port, tls, 2, ["--subflows", "auto", *argv])
    one, two = _pools(client)
    assert (one.autok is not None, two.autok is None) == (True, True)
    controller = ScriptedController.made[0]
    assert (controller.k_min, controller.k_max, controller.target) == (2, 8, 4)
    assert len(ScriptedController.made) == 1  # "two" has a fixed K
    await wait_for(lambda: _server_sources(server).total() == 6, "4 + 2 subflows")
    stop = threading.Event()
    sock = await in_thread(socks_connect, client.socks_port, "127.0.0.1", target.port)
    transfer = in_thread(paced_echo, sock, stop)
    for k in (7, 2, 5):
        controller.script.append(k)
        await wait_for(
            lambda k=k: one.target == k and _server_sources(server)["127.0.0.1"] == k,
            f"path one at {k} subflows",
        )
    stop.set()
    sent, sent_sha, received, received_sha = await transfer
    assert sent > 0 and (received, received_sha) == (sent, sent_sha)
    assert one.k_reason == "scripted 5"
    assert _server_sources(server)["127.0.0.2"] == 2  # the other path kept its K
    # The controller heard the path's own figures: busy, with payload moving.
    assert any(busy and goodput > 0 for _, goodput, busy, _ in controller.seen)
    status = one.status()
    assert (status.auto, status.target, status.k_reason) == (True, 5, "scripted 5")
