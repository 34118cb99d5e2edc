"""Which TCP congestion control the subflow sockets use (pure).

On a lossy long path a loss-based algorithm (CUBIC, the Linux default)
halves its window at every loss, so K CUBIC subflows reach only a fraction
of the link; BBR paces at the measured bottleneck rate and ignores random
loss (issue 11: 80 ms, 1 % loss, 100 Mbit/s: 12 Mbit/s for six TCP flows,
86.8 Mbit/s with BBR subflows).  On a clean path the roles turn: BBR
reached 0.85-0.9 x one CUBIC flow on the emulator (40 ms, 200 Mbit/s; its
gain cycling and RTT probes leave capacity unused) and took a smaller share
than CUBIC next to a neighbour.  So ``auto`` starts every subflow on the
system default and moves a subflow to BBR once it has *shown* random loss:
packets lost while its smoothed RTT is close to the lowest it has seen, so
no queue was full (:func:`random_loss`, pooled over the subflows of one
route by :class:`RandomLossVote`).  The move is one way: a path that drops
packets at random keeps doing so, and later subflows of that route start
on BBR.

Linux lets an unprivileged process set an algorithm only if it is loaded
(``tcp_available_congestion_control``) *and* listed in
``tcp_allowed_congestion_control``; with CAP_NET_ADMIN any loaded one will
do.  The decision here works on those facts; ``stripeproxy.net.congestion``
reads them from ``/proc`` and checks the answer on a real socket once, so
the choice is logged once at start and never per subflow.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from stripeproxy.core.kcontrol import TcpSample

__all__ = [
    "AUTO",
    "PREFERRED",
    "Choice",
    "RandomLossVote",
    "choose",
    "random_loss",
    "unusable",
]

#: The ``--congestion`` value that picks for the user.
AUTO = "auto"
#: What ``auto`` asks for when it can.
PREFERRED = "bbr"


@dataclass(frozen=True)
class Choice:
    """The algorithm the subflows use, and why.

    ``apply`` says whether subflow sockets must be set to ``algorithm``
    (False: the kernel's default is left alone, and ``algorithm`` names it).
    ``upgrade`` is the algorithm a subflow moves to once it shows random
    loss (None: it keeps ``algorithm``).
    """

    algorithm: str
    apply: bool
    reason: str
    upgrade: str | None = None

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
            default,
            False,
            f"{default} for subflows (system default), {PREFERRED} for each one that "
            f"shows random loss ({PREFERRED} {_usable(PREFERRED, allowed)})",
            upgrade=PREFERRED,
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


def unusable(name: str, default: str, error: str) -> Choice:
    """The choice after setting ``name`` on a probe socket failed (the lists
    said yes, the kernel said no: a namespace or security module)."""
    return Choice(default, False, f"{default} (system default): {name} could not be set ({error})")


#: A loss is random when the smoothed RTT was at most this factor of the
#: lowest RTT, plus the slack: a full drop-tail queue adds far more (one of
#: 1,000 packets is 60 ms at 200 Mbit/s), while scheduling noise on a LAN
#: path adds a millisecond or so.
RANDOM_LOSS_RTT_FACTOR = 1.25
RANDOM_LOSS_RTT_SLACK_US = 2_000


def random_loss(before: TcpSample, after: TcpSample) -> bool | None:
    """Between two readings of one subflow: True if it lost packets with no
    queue to explain it, False if it lost them behind a standing queue
    (congestion), None if it lost none or the kernel gave no RTTs."""
    if after.total_retrans <= before.total_retrans or not after.rtt_us or not after.min_rtt_us:
        return None
    limit = after.min_rtt_us * RANDOM_LOSS_RTT_FACTOR + RANDOM_LOSS_RTT_SLACK_US
    return after.rtt_us <= limit


class RandomLossVote:
    """Whether one route (a local and a peer address: the subflows that share
    a path) drops packets at random, from its subflows' readings.

    Every reading round (0.5 s) each subflow's :func:`random_loss` verdict
    is a vote; the round goes to random loss if more of its subflows lost
    packets with no queue than behind one, and to congestion if fewer.  One
    round can mislead (a slow start that overshoots fills the queue within
    one round trip, faster than the smoothed RTT follows), so random rounds
    score +1 and congested ones -1 (never below 0), and the verdict is given
    once the score reaches ``needed``.  Pooling the subflows of a route
    gathers the evidence K times faster than judging each alone, and a
    subflow the scheduler gives little data (so few losses) moves with its
    route.
    """

    def __init__(self, needed: int = 2) -> None:
        self.needed = needed
        self.score = 0

    @property
    def decided(self) -> bool:
        return self.score >= self.needed

    def round(self, verdicts: Iterable[bool | None]) -> bool:
        """One reading round's verdicts; True exactly once, when the verdict is reached."""
        if self.decided:
            return False
        votes = [v for v in verdicts if v is not None]
        random, congested = sum(votes), len(votes) - sum(votes)
        if random > congested:
            self.score += 1
        elif congested > random:
            self.score = max(0, self.score - 1)
        return self.decided
