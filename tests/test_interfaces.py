"""This host's interface addresses, as the target policy's built-in deny sees them."""

from __future__ import annotations

import ipaddress

from twisted.internet.task import Clock

from stripeproxy.core.policy import TargetPolicy, parse_rule
from stripeproxy.net.interfaces import LocalAddresses, interface_addresses, normalise


class Reads:
    """An injected address source: answers in turn, or raises."""

    def __init__(self, *answers: list[str] | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> list[str]:
        self.calls += 1
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_normalise_drops_zones_maps_ipv4_and_skips_junk() -> None:
    assert normalise(["fe80::1%eth0", "::ffff:192.0.2.7", "10.0.0.1", "eth0", ""]) == {
        ipaddress.ip_address("fe80::1"),
        ipaddress.ip_address("192.0.2.7"),
        ipaddress.ip_address("10.0.0.1"),
    }


def test_addresses_are_read_again_only_after_the_ttl() -> None:
    clock = Clock()
    reads = Reads(["192.0.2.2"], ["192.0.2.2", "198.51.100.9"])
    local = LocalAddresses(clock, ttl=5.0, read=reads)
    assert local.current() == {ipaddress.ip_address("192.0.2.2")}
    clock.advance(4.9)
    assert local.current() == {ipaddress.ip_address("192.0.2.2")}
    assert reads.calls == 1  # cached: not one read per target
    clock.advance(0.1)
    assert ipaddress.ip_address("198.51.100.9") in local.current()  # a new address
    assert reads.calls == 2
    assert not TargetPolicy().permits("198.51.100.9", 80, local.current())
    assert clock.getDelayedCalls() == []  # read on demand, no timer


def test_a_failed_read_keeps_the_last_set_and_logs_once(log_messages: list[str]) -> None:
    clock = Clock()
    reads = Reads(["192.0.2.2"], OSError("no netlink"), OSError("still none"), ["192.0.2.3"])
    local = LocalAddresses(clock, ttl=1.0, read=reads)
    assert local.current() == {ipaddress.ip_address("192.0.2.2")}
    for _ in range(2):
        clock.advance(1.0)
        assert local.current() == {ipaddress.ip_address("192.0.2.2")}
    errors = [m for m in log_messages if "cannot list this host's interface addresses" in m]
    assert len(errors) == 1 and "no netlink" in errors[0] and "the 1 known" in errors[0]
    clock.advance(1.0)
    assert local.current() == {ipaddress.ip_address("192.0.2.3")}


def test_refresh_reads_at_once() -> None:
    clock = Clock()
    reads = Reads(["192.0.2.2"])
    local = LocalAddresses(clock, read=reads)
    local.refresh()
    assert reads.calls == 1
    local.current()
    assert reads.calls == 1


def test_every_real_address_of_this_host_is_denied_by_default() -> None:
    addresses = interface_addresses()
    local = LocalAddresses(Clock()).current()
    assert ipaddress.ip_address("127.0.0.1") in local or ipaddress.ip_address("::1") in local
    assert local == normalise(addresses)
    policy = TargetPolicy(allow=[parse_rule("*"), parse_rule("0.0.0.0/0"), parse_rule("[::/0]")])
    for address in addresses:
        assert not TargetPolicy().permits(address, 80, local), address
        assert not policy.permits(address, 80, local), address
