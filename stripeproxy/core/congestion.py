"""Which TCP congestion control the subflow sockets use (pure).

On a lossy long path a loss-based algorithm (CUBIC, the Linux default)
halves its window at every loss, so K CUBIC subflows reach only a fraction
of the link; BBR paces at the measured bottleneck rate and ignores random
loss (issue 11: 80 ms, 1 % loss, 100 Mbit/s: 12 Mbit/s for six TCP flows,
86.8 Mbit/s with BBR subflows).  ``auto`` therefore asks for BBR wherever the
kernel offers it to this process, and otherwise leaves the system default.

Linux lets an unprivileged process set an algorithm only if it is loaded
(``tcp_available_congestion_control``) *and* listed in
``tcp_allowed_congestion_control``; with CAP_NET_ADMIN any loaded one will
do.  The decision here works on those facts; ``stripeproxy.net.congestion``
reads them from ``/proc`` and checks the answer on a real socket once, so
the choice is logged once at start and never per subflow.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

__all__ = ["AUTO", "PREFERRED", "Choice", "choose", "unusable"]

#: The ``--congestion`` value that picks for the user.
AUTO = "auto"
#: What ``auto`` asks for when it can.
PREFERRED = "bbr"


@dataclass(frozen=True)
class Choice:
    """The algorithm the subflows use, and why.

    ``apply`` says whether subflow sockets must be set to ``algorithm``
    (False: the kernel's default is left alone, and ``algorithm`` names it).
    """

    algorithm: str
    apply: bool
    reason: str

    @property
    def log_line(self) -> str:
        """The one line logged at start."""
        return f"congestion control: {self.reason}"


def _why_not(
    name: str, available: Collection[str], allowed: Collection[str], privileged: bool
) -> str:
    """Why this process cannot set ``name`` ('' when it can)."""
    if not available:
        # macOS, Windows, or a /proc this process may not read.
        return f"{name} is not available to this process (the system lists no algorithms)"
    if name not in available:
        return f"{name} is not available to this process (not loaded: modprobe tcp_{name})"
    if name not in allowed and not privileged:
        return (
            f"{name} is not available to this process (not allowed: add it to "
            "net.ipv4.tcp_allowed_congestion_control, or run with CAP_NET_ADMIN)"
        )
    return ""


def _usable(name: str, allowed: Collection[str]) -> str:
    """The parenthesis saying why ``name`` may be used."""
    return "available, allowed" if name in allowed else "available, privileged"


def choose(
    requested: str,
    available: Collection[str],
    allowed: Collection[str],
    privileged: bool,
    default: str,
) -> Choice:
    """Decide the subflows' algorithm.

    ``requested`` is ``auto`` or an algorithm name; ``available``,
    ``allowed`` and ``default`` are the kernel's lists and default (see
    the module docstring); ``privileged``: the process holds CAP_NET_ADMIN.
    """
    requested = requested.strip().lower()
    if requested == AUTO:
        if default == PREFERRED:
            return Choice(default, False, f"{default} for subflows (system default)")
        why = _why_not(PREFERRED, available, allowed, privileged)
        if why:
            return Choice(default, False, f"{default} (system default): {why}")
        return Choice(
            PREFERRED,
            True,
            f"{PREFERRED} for subflows ({_usable(PREFERRED, allowed)})",
        )
    if requested == default:
        return Choice(default, False, f"{default} for subflows (requested; system default)")
    why = _why_not(requested, available, allowed, privileged)
    if why:
        return Choice(
            default,
            False,
            f"{default} (system default): cannot use --congestion {requested}: {why}",
        )
    return Choice(
        requested,
        True,
        f"{requested} for subflows (requested; {_usable(requested, allowed)})",
    )


def unusable(choice: Choice, default: str, error: str) -> Choice:
    """The choice after setting ``choice.algorithm`` on a probe socket failed
    (the lists said yes, the kernel said no: a namespace or security module)."""
    return Choice(
        default,
        False,
        f"{default} (system default): {choice.algorithm} could not be set ({error})",
    )
