"""Which targets the server may dial: allow/deny rules by network and port,
over a built-in deny of the server's own host and special-purpose ranges.

Rules are checked against the *resolved* addresses, so a hostname that
resolves into a denied network is denied too, and the server then dials the
address it checked (no second lookup that could answer differently).

Safe by default.  A key holder is a relay user, not an administrator of the
server: without any rule the server still refuses to dial

* its own host: loopback (127.0.0.0/8, ::1), the unspecified addresses
  (0.0.0.0/8, ::), which Linux connects to the local host, and every address
  on its own interfaces (passed in by the net layer, see
  :mod:`stripeproxy.net.interfaces`), so a service bound to the public address
  or to 0.0.0.0 is not reachable through the proxy either;
* link-local (169.254.0.0/16 with the cloud metadata service
  169.254.169.254, fe80::/10), multicast (224.0.0.0/4, ff00::/8), limited
  broadcast and the reserved 240.0.0.0/4, and the deprecated IPv4-compatible
  IPv6 block ::/96;
* any IPv6 address that carries one of those IPv4 addresses: IPv4-mapped
  ``::ffff:a.b.c.d`` (the kernel dials the IPv4 address itself, so it is
  checked *as* IPv4), IPv4-translated ``::ffff:0:a.b.c.d``, IPv4-compatible
  ``::a.b.c.d``, NAT64 (64:ff9b::/96 and the local-use 64:ff9b:1::/48, where
  every RFC 6052 position is tried since the prefix length is not known),
  6to4 (2002::/16) and Teredo (2001::/32, server and client).

Private ranges (10/8, 172.16/12, 192.168/16, 100.64/10 shared address space,
fc00::/7) are *allowed* by default: reaching a private network behind the
server is often the reason it exists, as with a VPN concentrator or a SOCKS
exit in a VPC, and denying them would make most first deployments fail in a
way that looks like a bug.  An operator who does not want that says so with
``--deny`` (the names are in :data:`PRIVATE_NETWORKS`; the server logs a line
at start saying which choice is in force).  The server's own private
addresses are denied all the same, as its own interface addresses.

Precedence, for a target address and port:

1. An operator ``--deny`` rule that matches the address, or any IPv4 address
   embedded in it, denies.
2. A built-in deny that matches the address (or an embedded IPv4 address)
   denies, unless an ``--allow`` rule that matches it *names the range*: the
   rule has a network, and that network lies within a built-in range that
   contains the address.  ``--allow 127.0.0.0/8`` or ``--allow
   127.0.0.1/32:8080`` re-open (that part of) loopback; ``--allow
   203.0.113.5/32`` re-opens the server's own public address.  A catch-all
   never re-opens anything: ``*``, ``*:443``, ``0.0.0.0/0``, ``[::/0]``, or an
   allowed private network that happens to hold the server's own address
   (``--allow 10.0.0.0/8`` does not make the server's 10.0.0.5 reachable).
3. With any ``--allow`` rules, only an address matching one of them (as
   dialled: an IPv4-mapped address as its IPv4 address) is dialled; without
   any, every address not denied above is.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Rule:
    """A network (None: any address) and an inclusive port range."""

    network: IPNetwork | None
    low: int = 1
    high: int = 65535

    def matches(self, address: IPAddress, port: int) -> bool:
        if not self.low <= port <= self.high:
            return False
        if self.network is None:
            return True
        if address.version != self.network.version:
            return False
        return address in self.network

    def __str__(self) -> str:
        where = "*" if self.network is None else str(self.network)
        if (self.low, self.high) == (1, 65535):
            return where
        if self.network is not None and self.network.version == 6:
            where = f"[{where}]"
        return f"{where}:{self.low}-{self.high}"


def parse_rule(text: str) -> Rule:
    """``CIDR``, ``CIDR:PORT``, ``CIDR:LOW-HIGH``, ``[v6/len]:PORT`` or ``*:PORT``."""
    text = text.strip()
    ports = ""
    if text.startswith("["):
        where, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad rule {text!r}: expected [IPv6/len]:ports")
        ports = rest[1:]
    elif text.count(":") == 1 or text.startswith("*:"):
        where, _, ports = text.partition(":")
    else:
        where = text  # a bare IPv6 network, or IPv4 without ports
    if where == "*":
        network = None
    else:
        try:
            network = ipaddress.ip_network(where, strict=False)
        except ValueError:
            raise ValueError(f"bad network in rule {text!r}") from None
    low, high = 1, 65535
    if ports:
        first, dash, last = ports.partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise ValueError(f"bad port range in rule {text!r}") from None
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad port range in rule {text!r}")
    return Rule(network, low, high)


def _net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


# Denied unless an --allow rule names the range (see the module docstring).
# The most specific range comes first, so the reason logged is the precise one.
SPECIAL_NETWORKS: tuple[tuple[IPNetwork, str], ...] = (
    (_net("255.255.255.255/32"), "limited broadcast"),
    (_net("169.254.169.254/32"), "the cloud metadata service"),
    (_net("0.0.0.0/8"), "unspecified ('this host')"),
    (_net("127.0.0.0/8"), "loopback"),
    (_net("169.254.0.0/16"), "link-local"),
    (_net("224.0.0.0/4"), "multicast"),
    (_net("240.0.0.0/4"), "reserved"),
    (_net("::/128"), "unspecified ('this host')"),
    (_net("::1/128"), "loopback"),
    (_net("::/96"), "IPv4-compatible (deprecated)"),
    (_net("fe80::/10"), "link-local"),
    (_net("ff00::/8"), "multicast"),
)

# Allowed by default (see the module docstring for why); deniable with --deny.
PRIVATE_NETWORKS: tuple[IPNetwork, ...] = (
    _net("10.0.0.0/8"),
    _net("172.16.0.0/12"),
    _net("192.168.0.0/16"),
    _net("100.64.0.0/10"),
    _net("fc00::/7"),
)

_TRANSLATED = _net("::ffff:0:0:0/96")  # RFC 2765 IPv4-translated (SIIT)
_COMPATIBLE = _net("::/96")
_NAT64_WELL_KNOWN = _net("64:ff9b::/96")  # RFC 6052
_NAT64_LOCAL = _net("64:ff9b:1::/48")  # RFC 8215: prefix length of the operator's choice
# RFC 6052 section 2.2: where the 32 IPv4 bits sit (byte offsets, skipping
# the reserved octet 8) for each prefix length a NAT64 prefix may have.
_RFC6052_BYTES = {
    32: (4, 5, 6, 7),
    40: (5, 6, 7, 9),
    48: (6, 7, 9, 10),
    56: (7, 9, 10, 11),
    64: (9, 10, 11, 12),
    96: (12, 13, 14, 15),
}


def parse_address(text: str) -> IPAddress:
    """An IP literal as resolvers and SOCKS give them, without its zone id
    (``fe80::1%eth0`` is checked as ``fe80::1``; the zone picks an interface,
    not an address).  Only canonical literals: anything else raises
    ``ValueError`` and must go through the resolver first."""
    return ipaddress.ip_address(text.split("%", 1)[0])


def dialled_address(ip: IPAddress) -> IPAddress:
    """The address a connection to ``ip`` really goes to: an IPv4-mapped
    IPv6 address is its IPv4 address (the kernel sends IPv4 packets)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address carries, in the forms by which
    packets may be delivered to that IPv4 address: mapped, translated,
    compatible, NAT64, 6to4 and Teredo (server and client)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    # :: and ::1 lie in ::/96 but are not IPv4-compatible (RFC 4291 2.5.5.1).
    compatible = ip in _COMPATIBLE and int(ip) > 1
    if compatible or ip in _TRANSLATED or ip in _NAT64_WELL_KNOWN:
        found.append(ipaddress.IPv4Address(ip.packed[12:]))
    if ip in _NAT64_LOCAL:
        packed = ip.packed
        for length, offsets in _RFC6052_BYTES.items():
            if length >= _NAT64_LOCAL.prefixlen:
                found.append(ipaddress.IPv4Address(bytes(packed[i] for i in offsets)))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


@dataclass(frozen=True)
class Verdict:
    """The answer for one address: whether it may be dialled, and why not
    (one line for the log, naming the rule or range and how to allow it)."""

    permitted: bool
    reason: str = ""


_PERMITTED = Verdict(True)


@dataclass
class TargetPolicy:
    """Operator rules over the built-in deny; precedence in the module docstring.

    The policy is pure: the server's own interface addresses come in as data
    (``local``) on every check, so the net layer decides how fresh they are.
    """

    allow: list[Rule] = field(default_factory=list)
    deny: list[Rule] = field(default_factory=list)

    def check(
        self, address: str, port: int, local: AbstractSet[IPAddress] = frozenset()
    ) -> Verdict:
        """The verdict for dialling the IP literal ``address`` on ``port``.

        ``local`` holds the server's own interface addresses; an IPv4-mapped
        one counts as its IPv4 address.  ``address`` must be a literal (see
        :func:`parse_address`); anything else raises ``ValueError``.
        """
        ip = parse_address(address)
        dialled = dialled_address(ip)
        # Every address the connection may end up at: deny looks through
        # each wrapper; allow matches what is dialled.
        candidates = [dialled, *(a for a in embedded_ipv4(ip) if a != dialled)]
        if ip != dialled:
            candidates.append(ip)  # so a deny rule on ::ffff:0:0/96 works too
        for candidate in candidates:
            for rule in self.deny:
                if rule.matches(candidate, port):
                    return Verdict(
                        False, f"{_shown(address, candidate)} is denied by --deny {rule}"
                    )
        for candidate in candidates:
            ranges = self._builtin(candidate, local)
            if ranges and not self._exempt(candidate, port, ranges):
                network, why = ranges[0]
                return Verdict(
                    False,
                    f"{_shown(address, candidate)} is {why}, denied by default "
                    f"(allow it with --allow {_rule_text(network)})",
                )
        if self.allow and not any(rule.matches(dialled, port) for rule in self.allow):
            return Verdict(False, f"{_shown(address, dialled)} port {port} matches no --allow rule")
        return _PERMITTED

    def permits(self, address: str, port: int, local: AbstractSet[IPAddress] = frozenset()) -> bool:
        """Whether the IP literal ``address`` may be dialled on ``port``."""
        return self.check(address, port, local).permitted

    def filter(
        self, addresses: Iterable[str], port: int, local: AbstractSet[IPAddress] = frozenset()
    ) -> list[str]:
        """The permitted ones of ``addresses`` (resolver answers), in their
        order and spelling: the net layer dials exactly these strings and
        never the name again.  Anything that is not an IP literal is dropped
        (a resolver that answers with a name is not to be trusted)."""
        permitted = []
        for address in addresses:
            try:
                if self.permits(address, port, local):
                    permitted.append(address)
            except ValueError:
                continue
        return permitted

    def describe(self, local: AbstractSet[IPAddress] = frozenset()) -> str:
        """One line for the server's start-up log: what is denied without
        being asked, and whether private ranges are open."""
        private = ", ".join(str(n) for n in PRIVATE_NETWORKS)
        closed = [n for n in PRIVATE_NETWORKS if any(_covers(r, n) for r in self.deny)]
        if self.allow:
            private_state = "only --allow'ed targets are dialled"
        elif len(closed) == len(PRIVATE_NETWORKS):
            private_state = f"private ranges denied by --deny ({private})"
        else:
            private_state = (
                f"private ranges ({private}) are ALLOWED; deny them with --deny, "
                "e.g. --deny 10.0.0.0/8"
            )
        return (
            "target policy: denied by default: loopback, unspecified, link-local "
            "(incl. 169.254.169.254), multicast, broadcast, reserved, IPv6 forms "
            f"embedding them, and this host's {len(local)} interface addresses; "
            f"{private_state}; {len(self.allow)} allow and {len(self.deny)} deny rules"
        )

    @staticmethod
    def _builtin(ip: IPAddress, local: AbstractSet[IPAddress]) -> list[tuple[IPNetwork, str]]:
        """The built-in ranges that contain ``ip``, most specific first."""
        found = [(net, why) for net, why in SPECIAL_NETWORKS if _contains(net, ip)]
        if ip in local or (isinstance(ip, ipaddress.IPv4Address) and _mapped(ip) in local):
            found.insert(0, (ipaddress.ip_network(ip), "this server's own address"))
        return found

    def _exempt(self, ip: IPAddress, port: int, ranges: list[tuple[IPNetwork, str]]) -> bool:
        """Whether an --allow rule matching ``ip`` names (a part of) one of
        the built-in ``ranges`` that contain it."""
        return any(
            rule.network is not None
            and rule.matches(ip, port)
            and any(_covers(net, rule.network) for net, _ in ranges)
            for rule in self.allow
        )


def _contains(network: IPNetwork, ip: IPAddress) -> bool:
    return ip.version == network.version and ip in network


def _covers(outer: IPNetwork | Rule, inner: IPNetwork) -> bool:
    """Whether ``inner`` lies within ``outer`` (a network, or a rule's network)."""
    if isinstance(outer, Rule):
        if outer.network is None:
            return (outer.low, outer.high) == (1, 65535)
        if (outer.low, outer.high) != (1, 65535):
            return False
        outer = outer.network
    if outer.version != inner.version:
        return False
    return inner.subnet_of(outer)  # type: ignore[arg-type]


def _mapped(ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)


def _shown(address: str, checked: IPAddress) -> str:
    """The target as requested, and the address that decided, if different."""
    text = ascii(address)[1:-1]  # the literal came from the network: escaped
    if str(checked) == text:
        return text
    return f"{text} ({checked})"


def _rule_text(network: IPNetwork) -> str:
    return f"[{network}]" if network.version == 6 else str(network)
