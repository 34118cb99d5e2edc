"""Which targets the server may dial: allow/deny rules by network and port.

Rules are checked against the *resolved* addresses, so a hostname that
resolves into a denied network is denied too, and the server then dials the
address it checked (no second lookup that could answer differently).
"""

from __future__ import annotations

import ipaddress
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


@dataclass
class TargetPolicy:
    """Deny rules win; with allow rules present, a target must match one of them."""

    allow: list[Rule] = field(default_factory=list)
    deny: list[Rule] = field(default_factory=list)

    def permits(self, address: str, port: int) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 for the rules
        if any(rule.matches(ip, port) for rule in self.deny):
            return False
        return not self.allow or any(rule.matches(ip, port) for rule in self.allow)

    @property
    def unrestricted(self) -> bool:
        return not (self.allow or self.deny)
