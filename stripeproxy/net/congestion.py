"""What the kernel offers this process, read once at start (Linux).

The taps call :func:`resolve` while building their service: it reads the
kernel's lists from ``/proc``, lets :func:`stripeproxy.core.congestion.choose`
decide, checks the decision on one probe socket, and logs one line.  The
subflows then set the chosen algorithm without asking again (and
:mod:`stripeproxy.net.loss_watch` moves them to the upgrade when they show
random loss), and report the algorithm their socket really uses
(:func:`in_use`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from stripeproxy.core.congestion import Choice, choose, unusable

__all__ = [
    "KernelCC",
    "decide",
    "in_use",
    "read_kernel",
    "resolve",
    "set_algorithm",
    "tcp_option",
    "try_set",
]

_PROC = Path("/proc/sys/net/ipv4")
_CAP_NET_ADMIN = 12
# The kernel's TCP_CA_NAME_MAX.
_NAME_MAX = 16

log = Logger()


@dataclass(frozen=True)
class KernelCC:
    """The facts :func:`choose` decides on."""

    available: frozenset[str]
    allowed: frozenset[str]
    privileged: bool
    default: str


def _read_words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _privileged(status: Path = Path("/proc/self/status")) -> bool:
    """The process holds CAP_NET_ADMIN (root usually does)."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0 if hasattr(os, "geteuid") else False


def read_kernel(proc: Path = _PROC, status: Path = Path("/proc/self/status")) -> KernelCC:
    """The kernel's lists; empty where they cannot be read (not Linux)."""
    default = _read_words(proc / "tcp_congestion_control")
    return KernelCC(
        available=frozenset(_read_words(proc / "tcp_available_congestion_control")),
        allowed=frozenset(_read_words(proc / "tcp_allowed_congestion_control")),
        privileged=_privileged(status),
        default=default[0] if default else "default",
    )


def tcp_option(sock: socket.socket, name: str, size: int) -> bytes | None:
    """``getsockopt(IPPROTO_TCP, socket.<name>, size)``; None where the platform
    has no such option or the socket cannot answer (not TCP, closed)."""
    option = getattr(socket, name, None)
    if option is None:
        return None
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, option, size)
    except OSError:
        return None


def in_use(sock: socket.socket) -> str | None:
    """The algorithm ``sock`` uses (None where the platform cannot say)."""
    raw = tcp_option(sock, "TCP_CONGESTION", _NAME_MAX)
    if raw is None:
        return None
    return raw.split(b"\0", 1)[0].decode("ascii", "replace") or None


def try_set(name: str) -> str:
    """Set ``name`` on a fresh TCP socket: '' if it worked, else why not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return set_algorithm(sock, name)


def resolve(
    requested: str | None,
    kernel: Callable[[], KernelCC] = read_kernel,
    probe: Callable[[str], str] = try_set,
) -> Choice | None:
    """What the subflow sockets use (:class:`Choice`: set at connect or not,
    moved to on random loss or not), after logging once which and why.

    ``None`` or ``""`` as ``requested`` keeps the system default silently
    (a library caller that never asked) and returns None.
    """
    if not requested:
        return None
    choice = decide(requested, kernel(), probe)
    log.info("{line}", line=choice.log_line)
    return choice


def decide(requested: str, facts: KernelCC, probe: Callable[[str], str] = try_set) -> Choice:
    """:func:`choose`, checked on a probe socket for what it would set."""
    choice = choose(requested, facts.available, facts.allowed, facts.privileged, facts.default)
    for name in (choice.algorithm if choice.apply else None, choice.upgrade):
        error = probe(name) if name else ""
        if error:
            return unusable(name or "", facts.default, error)
    return choice


def set_algorithm(sock: socket.socket, name: str) -> str:
    """Switch a connected socket to ``name`` (Linux re-initialises its
    congestion state in place): '' if it worked, else why not."""
    option = getattr(socket, "TCP_CONGESTION", None)
    if option is None:
        return "this platform has no TCP_CONGESTION"
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, name.encode())
    except OSError as e:
        return e.strerror or str(e)
    return ""
