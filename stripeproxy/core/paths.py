"""Paths: the local sources a client's subflows leave from (pure; README "Bonding").

A *path* is a local source, an address or an interface name, with its own
subflows: ``--path wifi=wlan0:3 --path lte=wwan0:3`` keeps three subflows
bound to each uplink's current address, so one session spans both.  This
module parses the option and keeps what is pure about a path: whether it is
up, and the one log line each change of that deserves.  Resolving an
interface and binding sockets is :mod:`stripeproxy.net.paths`.

The spelling ``NAME=SOURCE[:K]``:

* ``NAME``: letters, digits, ``_`` and ``-`` (it becomes a metrics label);
* ``SOURCE``: an IPv4 address, an IPv6 address (in brackets when ``:K``
  follows, ``lte=[2001:db8::7]:2``), or an interface name;
* ``K``: the subflows the path keeps, a positive integer or ``auto``
  (default: ``--subflows``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "AUTO",
    "PathSpec",
    "PathState",
    "PathStatus",
    "parse_path",
    "parse_subflows",
    "validate_paths",
]

#: ``--subflows auto`` / ``NAME=SOURCE:auto``: the K controller sets the count.
AUTO = "auto"
#: The most subflows one path may ask for by number (a typo guard, not a limit of the design).
MAX_K = 64

_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
# Linux allows 15 bytes (IFNAMSIZ - 1); other systems' adapter names are longer.
_INTERFACE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")

Count = int | str  # a number of subflows, or AUTO


class SourceKind(StrEnum):
    ADDRESS = "address"
    INTERFACE = "interface"


@dataclass(frozen=True)
class PathSpec:
    """One ``--path`` as given: ``k`` is None when the option left it to ``--subflows``."""

    name: str
    source: str  # an address in canonical text, or an interface name
    kind: SourceKind
    k: Count | None = None

    @property
    def family(self) -> int | None:
        """4 or 6 for an address source; None for an interface (either)."""
        if self.kind is SourceKind.INTERFACE:
            return None
        return ipaddress.ip_address(self.source).version


def parse_subflows(text: str, what: str = "--subflows") -> Count:
    """A subflow count: a positive integer (at most :data:`MAX_K`) or ``auto``."""
    text = text.strip()
    if text.lower() == AUTO:
        return AUTO
    if not text.isdigit() or not 1 <= int(text) <= MAX_K:
        raise ValueError(f"{what} must be a number from 1 to {MAX_K} or 'auto', not {text!r}")
    return int(text)


def _address(text: str) -> str | None:
    """Canonical text of an IP address, or None if ``text`` is not one."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def parse_path(text: str) -> PathSpec:
    """Parse ``NAME=SOURCE[:K]``; ValueError says what is wrong, in one line."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    rest = rest.strip()
    if not sep or not rest:
        raise ValueError(f"--path {text!r}: expected NAME=SOURCE[:K]")
    if not _NAME.fullmatch(name):
        raise ValueError(f"--path {text!r}: the name must be 1 to 32 letters, digits, '_' or '-'")
    k: Count | None = None
    if rest.startswith("["):
        inside, close, tail = rest[1:].partition("]")
        address = _address(inside)
        if not close or address is None or ipaddress.ip_address(address).version != 6:
            raise ValueError(f"--path {text!r}: expected [IPv6 address] in brackets")
        if tail:
            if not tail.startswith(":"):
                raise ValueError(f"--path {text!r}: expected :K after the brackets")
            k = parse_subflows(tail[1:], f"--path {name}: K")
        return PathSpec(name, address, SourceKind.ADDRESS, k)
    whole = _address(rest)
    if whole is not None:  # an address without :K (an IPv6 one may hold colons)
        return PathSpec(name, whole, SourceKind.ADDRESS)
    source, colon, count = rest.rpartition(":")
    if colon:
        if ":" in source:
            raise ValueError(f"--path {text!r}: put an IPv6 address in brackets before :K")
        k = parse_subflows(count, f"--path {name}: K")
    else:
        source = rest
    source = source.strip()
    address = _address(source)
    if address is not None:
        return PathSpec(name, address, SourceKind.ADDRESS, k)
    if not _INTERFACE.fullmatch(source) or source.replace(".", "").isdigit():
        raise ValueError(f"--path {text!r}: {source!r} is neither an IP address nor an interface")
    return PathSpec(name, source, SourceKind.INTERFACE, k)


def validate_paths(paths: list[PathSpec]) -> None:
    """Names are unique, and no two paths share a source (that would be one uplink
    counted twice, a typo far more often than a wish)."""
    seen: dict[str, PathSpec] = {}
    sources: dict[tuple[SourceKind, str], PathSpec] = {}
    for path in paths:
        if path.name in seen:
            raise ValueError(f"--path {path.name} is given twice: path names must differ")
        seen[path.name] = path
        other = sources.get((path.kind, path.source))
        if other is not None:
            raise ValueError(
                f"--path {other.name} and --path {path.name} both leave from {path.source}"
            )
        sources[(path.kind, path.source)] = path


# ------------------------------------------------------------------ state


@dataclass(frozen=True)
class PathStatus:
    """One path as the dashboard and the metrics show it."""

    name: str  # "" for the implicit path (no --path)
    source: str  # what was given: an address, an interface, or "" (the route decides)
    state: str  # "starting", "up" (a subflow joined), "down" (see ``why``)
    why: str  # why it is down ("" otherwise)
    address: str  # the address subflows bind to now ("" if none, or unbound)
    open: int  # subflows joined now
    target: int  # subflows the path keeps (K; the controller's target under auto)
    auto: bool  # K follows the controller (--subflows auto)
    k_reason: str  # why K last moved ("" until it does)
    tcp_retransmits: int  # segments the kernel re-sent on this path's live subflows
    since: float  # when ``state`` last changed


class PathState:
    """Up or down, with the one line worth logging on each change.

    A path is *up* while at least one of its subflows is joined and *down*
    when its source has no usable address or its last subflow failed; a
    path is never logged once per attempt, only when its state or its
    reason changes.  Methods return the line to log (or None): the adapter
    owns the logger, this object owns the wording.
    """

    def __init__(self, name: str, now: float) -> None:
        self.name = name
        self.state = "starting"
        self.why = ""
        self.since = now
        self.joined = 0  # subflows joined now

    def _label(self) -> str:
        return f"path {self.name}" if self.name else "the route"

    def down(self, why: str, now: float) -> str | None:
        """The source is unusable or a dial failed with no subflow joined."""
        if self.joined:
            return None  # other subflows still carry it: a slot's failure, not the path's
        if self.state == "down" and why == self.why:
            return None
        self.state, self.why, self.since = "down", why, now
        return f"{self._label()} down: {why}"

    def subflow_joined(self, now: float) -> str | None:
        self.joined += 1
        if self.state == "up":
            return None
        came_back = self.state == "down"
        self.state, self.why, self.since = "up", "", now
        return f"{self._label()} up" if came_back or self.name else None

    def source_gone(self, why: str, now: float) -> str | None:
        """The source lost its address while subflows used it: down at once
        (they are being closed), whatever is still counted as joined."""
        if self.state == "down" and why == self.why:
            return None
        self.state, self.why, self.since = "down", why, now
        return f"{self._label()} down: {why}"

    def subflow_lost(self, why: str, now: float) -> str | None:
        """A joined subflow is gone; the last one takes the path down."""
        self.joined = max(0, self.joined - 1)
        if self.joined or self.state == "down":
            return None
        return self.down(f"its last subflow was lost ({why})", now)
