"""This host's own interface addresses, for the target policy's built-in deny.

The policy (:mod:`stripeproxy.core.policy`) is pure and takes the set as
data; this module reads it from the operating system.  The standard library
cannot list interface addresses (``socket.if_nameindex`` gives names only),
so this uses ``ifaddr``: pure Python over ``getifaddrs(3)`` (and
``GetAdaptersAddresses`` on Windows) through ctypes, typed, no compiled code
and no dependencies of its own, the same library python-zeroconf relies on.
``psutil`` can do it too but is a large C extension whose other 99 % the
server would never use.

Reading the list costs about 0.4 ms, too much for every stream a busy server
opens, and addresses change rarely (DHCP, a new VPN), so :class:`LocalAddresses`
re-reads it at most once per ``ttl`` seconds of the injected clock, on
demand: no timer, nothing to stop.  An address that appears is denied at the
latest ``ttl`` seconds later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import ifaddr
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from stripeproxy.core.policy import IPAddress, dialled_address, parse_address

_log = Logger()


def interface_addresses() -> list[str]:
    """Every address on every local interface, as text (IPv6 without zone)."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            # ifaddr gives IPv4 as a string, IPv6 as (address, flowinfo, scope_id).
            found.append(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
    return found


def normalise(addresses: Iterable[str]) -> frozenset[IPAddress]:
    """The addresses as the policy compares them (zones dropped, IPv4-mapped
    as IPv4); text that is not an address is skipped."""
    found: set[IPAddress] = set()
    for text in addresses:
        try:
            found.add(dialled_address(parse_address(text)))
        except ValueError:
            continue
    return frozenset(found)


class LocalAddresses:
    """The current set of this host's addresses, re-read at most every ``ttl`` s.

    ``current()`` is what the server passes to ``TargetPolicy.check`` and
    ``filter`` for every target.  A failed read keeps the previous set (and
    logs the reason once per failure streak): loopback and the other
    special ranges stay denied by the policy whatever happens here.
    """

    def __init__(
        self,
        clock: IReactorTime,
        ttl: float = 5.0,
        read: Callable[[], Iterable[str]] = interface_addresses,
    ) -> None:
        self._clock = clock
        self._ttl = ttl
        self._read = read
        self._addresses: frozenset[IPAddress] = frozenset()
        self._read_at: float | None = None
        self._failing = False

    def current(self) -> frozenset[IPAddress]:
        now = self._clock.seconds()
        if self._read_at is None or now - self._read_at >= self._ttl:
            self.refresh(now)
        return self._addresses

    def refresh(self, now: float | None = None) -> None:
        """Read the addresses now (also called once at start, so the start-up
        log can say how many there are)."""
        self._read_at = self._clock.seconds() if now is None else now
        try:
            addresses = normalise(self._read())
        except Exception as e:  # ctypes or OS errors: keep the last good set
            if not self._failing:
                _log.error(
                    "cannot list this host's interface addresses ({why}); "
                    "still denying the {n} known before",
                    why=repr(e),
                    n=len(self._addresses),
                )
            self._failing = True
            return
        self._failing = False
        self._addresses = addresses
