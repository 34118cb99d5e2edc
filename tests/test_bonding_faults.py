"""One path of a bonded session fails: reset, black-holed, or 20 times slower.

Topology (issue 12): echo target <- stripe-server <- FaultRelay <- stripe-client
with two paths, ``one`` leaving from 127.0.0.1 and ``two`` from 127.0.0.2
(Linux routes all of 127/8 to ``lo``).  The relay tells the paths apart by
the client address of each link, so the test breaks every subflow of path
``two`` at once while an echo runs, and checks the data with hashes both
ways.  Nothing here asserts a wall time.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from helpers import (
    Cleanup,
    EchoFactory,
    Keys,
    KiB,
    MiB,
    in_thread,
    socks_echo,
    start_client,
    start_relay,
    start_server,
    start_target,
    wait_for,
)
from test_faults import CLIENT_OPTIONS, RECOVERY, SERVER_OPTIONS, check_echo, under_way

from stripeproxy.testing.faults import FaultRelay, Link

SIZE = 32 * MiB
PATHS = ["--path", "one=127.0.0.1:2", "--path", "two=127.0.0.2:2"]


def path_two(relay: FaultRelay) -> list[Link]:
    """The live links whose client end is path two's address."""
    return [
        link
        for link in relay.live()
        if link.client_end.transport is not None
        and link.client_end.transport.getPeer().host == "127.0.0.2"
    ]


def carried_up(links: list[Link]) -> int:
    return sum(link.up.passed for link in links)


@pytest.mark.parametrize("fault", ["reset", "blackhole", "slow"])
@pytest_twisted.ensureDeferred
async def test_one_path_fails_mid_transfer_and_nothing_is_lost(
    cleanup: Cleanup, keys: Keys, fault: str
) -> None:
    target = await start_target(cleanup, EchoFactory())
    server = await start_server(cleanup, keys, True, SERVER_OPTIONS)
    relay, relay_port = await start_relay(cleanup, "127.0.0.1", server.port)
    client = await start_client(cleanup, keys, relay_port, True, 2, [*CLIENT_OPTIONS, *PATHS])
    await wait_for(lambda: len(relay.live()) == 4 and len(path_two(relay)) == 2, "four links")
    transfer = in_thread(socks_echo, client.socks_port, target.port, SIZE, 7)
    await under_way(relay, transfer, 4 * MiB)
    victims = path_two(relay)
    others = [link for link in relay.live() if link not in victims]
    before = carried_up(victims), carried_up(others)
    for link in victims:
        if fault == "reset":
            link.reset()
        elif fault == "blackhole":
            link.blackhole()
        else:
            # A twentieth of what one link carried so far per link, at least 32 KiB/s.
            link.throttle(max(before[0] / 2 / 20, 32 * KiB))
    result = await transfer
    check_echo(result, SIZE)
    if fault == "slow":
        # The adaptive scheduler moved the work to the fast path.
        slow = carried_up(victims) - before[0]
        fast = carried_up(others) - before[1]
        assert slow < 0.25 * (slow + fast), (slow, fast)
        for link in victims:
            link.throttle(None)
        return
    # The path is dialled again from its own address and carries the next transfer.
    await wait_for(
        lambda: len([v for v in path_two(relay) if v not in victims]) == 2,
        "path two dialled again",
        RECOVERY,
    )
    again = path_two(relay)
    start = carried_up(again)
    result = await in_thread(socks_echo, client.socks_port, target.port, 8 * MiB, 8)
    check_echo(result, 8 * MiB)
    assert carried_up(again) > start
