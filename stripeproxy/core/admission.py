"""Server admission, pure: the handshake pool, failed logins, per-key session quotas.

The server's Protocol classes only ask this object and act on its answers,
so every limit is tested on plain floats (tests/test_admission.py).  Time is
an argument (``now``), never read from a clock here.

Failed logins cost the failing *source* time, never the key holders: after
``n`` failures in a row from an address, that address's next CHALLENGE
waits ``min(delay_base * 2 ** (n - 1), delay_max)`` seconds (while holding a
slot of the handshake pool), and the failures are forgotten once it has been
quiet for ``failure_window`` seconds.  A client that proves the key is let in
however many failures its address has: ``delay_max`` is kept below the
handshake timeout, and nothing here refuses a connection because of failures
(SPEC.md section 2).

Per-key quotas (live sessions, session creations per interval) keep one key
holder from filling ``--max-sessions`` for everyone.  Every limit hit is
logged at most once per ``log_interval`` for the same limit and subject, with
the key id (escaped with ``!r``: it comes from the network) and the address
(escaped with :func:`~stripeproxy.core.escape.printable`: behind a balancer it
comes from the client's PROXY header).

Logging goes through txaio's framework-neutral logger, so this module needs
no Twisted import; the net layer selects Twisted (``txaio.use_twisted()``)
before it builds one.  Tests inject a recording logger instead.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Protocol

import txaio

from stripeproxy.core import wire
from stripeproxy.core.escape import printable
from stripeproxy.core.throttle import Throttle

__all__ = ["Admission", "AdmissionLimits", "Log"]

# Entries kept per table before stale ones are pruned (a spray of source addresses).
_MAX_TRACKED: Final = 10_000


class Log(Protocol):
    """The part of txaio's ILogger (and twisted.logger.Logger) used here."""

    def warn(self, format: str, **kwargs: Any) -> None: ...

    def info(self, format: str, **kwargs: Any) -> None: ...


@dataclass(frozen=True)
class AdmissionLimits:
    """The server's admission limits (ServerSettings carries the operator's choices)."""

    max_handshakes: int = 256  # subflows authenticating at once
    handshakes_per_address: int = 32  # of those, from one address (0: no share)
    max_sessions: int = 256  # live sessions, all keys together
    sessions_per_key: int = 32  # live sessions of one key (0: no quota)
    session_creations_per_key: int = 30  # new sessions of one key per interval (0: no quota)
    session_creation_interval: float = 60.0
    failure_window: float = 60.0  # quiet seconds after which an address's failures are forgotten
    failures_logged: int = 10  # failures of one address logged one by one; then once per interval
    delay_base: float = 0.5  # the delay after the first failure; doubles with each one
    delay_max: float = 5.0  # the longest; must stay below the handshake timeout
    log_interval: float = 60.0  # one line per limit and subject per this many seconds


@dataclass
class _Failures:
    count: int
    last: float  # time of the latest failure
    delay: float  # the address's CHALLENGEs wait until last + delay


def _more(suppressed: int) -> str:
    return f" ({suppressed} more since the last such line)" if suppressed else ""


class Admission:
    """Who may authenticate now, and which sessions may be created."""

    def __init__(self, limits: AdmissionLimits, log: Log | None = None) -> None:
        self.limits = limits
        if log is None:
            # txaio sets make_logger on the module at run time, once a framework
            # is chosen (txaio.use_twisted() in the net layer); mypy cannot see
            # it.  Called here, it names this class as the log namespace.
            log = txaio.make_logger()  # type: ignore[attr-defined]
        self.log: Log = log
        self.handshaking = 0  # subflows connected but not yet authenticated
        self.handshaking_from: dict[str, int] = {}  # the same, per source address
        self.sessions = 0  # live sessions, all keys
        self.sessions_of: dict[str, int] = {}  # live sessions per key id
        self._created: dict[str, deque[float]] = {}  # key id -> recent creation times
        self._failures: dict[str, _Failures] = {}  # address -> failures in a row; oldest first
        self._throttles: dict[tuple[str, str], Throttle] = {}  # (limit, subject)

    # ------------------------------------------------------- the handshake pool

    def begin_handshake(self, host: str, now: float) -> float | None:
        """A connection from ``host`` was accepted.

        Returns None to close it at once (the pool, or the address's share of
        it, is full), else the seconds to wait before its CHALLENGE; in both
        non-None cases the connection holds a pool slot until
        :meth:`end_handshake`.
        """
        limits = self.limits
        if self.handshaking >= limits.max_handshakes:
            # A flood of connections that never authenticate must not grow
            # memory without bound; established subflows are not affected.
            self._limit_hit(
                "handshakes",
                "",
                now,
                "{count} subflows are authenticating at once: refusing new connections "
                "until some finish (--max-handshakes){more}",
                count=self.handshaking,
            )
            return None
        share = limits.handshakes_per_address
        if share and self.handshaking_from.get(host, 0) >= share:
            # One address may not take the whole pool and lock everybody out.
            self._limit_hit(
                "address share",
                host,
                now,
                "{host} has {share} subflows authenticating at once: refusing its new "
                "connections until some finish{more}",
                host=printable(host),
                share=share,
            )
            return None
        self.handshaking += 1
        self.handshaking_from[host] = self.handshaking_from.get(host, 0) + 1
        return self.challenge_delay(host, now)

    def end_handshake(self, host: str) -> None:
        """The connection from ``host`` left the pool (joined, rejected or gone)."""
        self.handshaking -= 1
        left = self.handshaking_from[host] - 1
        if left:
            self.handshaking_from[host] = left
        else:
            del self.handshaking_from[host]

    def move_handshake(self, old: str, new: str) -> None:
        """Count a slot against ``new`` instead of ``old`` (a PROXY header named the source)."""
        self.end_handshake(old)
        self.handshaking += 1
        self.handshaking_from[new] = self.handshaking_from.get(new, 0) + 1

    # ------------------------------------------------------------ failed logins

    def challenge_delay(self, host: str, now: float) -> float:
        """Seconds ``host``'s next CHALLENGE waits because of its recent failures."""
        entry = self._failures.get(host)
        if entry is None:
            return 0.0
        if now - entry.last >= self.limits.failure_window:
            del self._failures[host]  # quiet long enough: forgiven
            return 0.0
        return max(0.0, entry.delay - (now - entry.last))

    def failures(self, host: str, now: float) -> int:
        """Failed logins in a row from ``host`` that are not yet forgotten."""
        self.challenge_delay(host, now)  # forgets an address that has been quiet long enough
        entry = self._failures.get(host)
        return 0 if entry is None else entry.count

    def auth_failed(self, host: str, key_id: str, now: float, peer: str = "") -> float:
        """Record a failed AUTH from ``host`` (``peer`` names the connection in
        the log); returns the delay its next CHALLENGE will wait."""
        limits = self.limits
        entry = self._failures.pop(host, None)  # re-inserted last: the dict stays oldest-first
        if entry is None or now - entry.last >= limits.failure_window:
            entry = _Failures(0, now, 0.0)
        entry.count += 1
        entry.last = now
        delay = min(limits.delay_base * 2.0 ** min(entry.count - 1, 62), limits.delay_max)
        entry.delay = delay
        self._failures[host] = entry
        self._prune_failures(now)
        fields = {
            "peer": printable(peer or host),
            "key": key_id,
            "host": printable(host),
            "count": entry.count,
        }
        if entry.count <= limits.failures_logged:
            last = entry.count == limits.failures_logged
            if last:  # the next line about this address comes a log interval later
                self._throttle("failures", host).due(now)
            self.log.warn(
                "subflow {peer}: authentication failed (key id {key!r}); {count} in a row "
                "from {host}, whose next CHALLENGE waits {delay:g} s{quiet}",
                delay=delay,
                quiet="; further failures are logged once a minute" if last else "",
                **fields,
            )
        else:
            self._limit_hit(
                "failures",
                host,
                now,
                "subflow {peer}: authentication failed (key id {key!r}); {count} in a row "
                "from {host}, whose CHALLENGEs wait {delay:g} s{more}",
                delay=delay,
                **fields,
            )
        return delay

    def _prune_failures(self, now: float) -> None:
        """Bound memory under a spray of addresses: drop the oldest entries,
        stale ones first (the dict is ordered by last failure)."""
        failures = self._failures
        window = self.limits.failure_window
        while failures:
            host, entry = next(iter(failures.items()))
            if now - entry.last < window and len(failures) <= _MAX_TRACKED:
                break
            del failures[host]

    # ----------------------------------------------------------------- sessions

    def open_session(self, key_id: str, host: str, now: float) -> int:
        """A proven subflow asks for a new session: 0 (counted as created) or a REJECT code."""
        limits = self.limits
        fields = {"key": key_id, "host": printable(host)}
        if self.sessions >= limits.max_sessions:
            self._limit_hit(
                "sessions",
                "",
                now,
                "key {key!r} from {host}: {count} sessions, the server's limit "
                "(--max-sessions): refusing new sessions{more}",
                count=self.sessions,
                **fields,
            )
            return wire.REJECT_TOO_MANY_SESSIONS
        live = self.sessions_of.get(key_id, 0)
        if limits.sessions_per_key and live >= limits.sessions_per_key:
            self._limit_hit(
                "sessions per key",
                key_id,
                now,
                "key {key!r} from {host}: {count} live sessions, the most one key may "
                "have: refusing its new sessions{more}",
                count=live,
                **fields,
            )
            return wire.REJECT_TOO_MANY_SESSIONS
        created = self._created.setdefault(key_id, deque())
        interval = limits.session_creation_interval
        while created and now - created[0] >= interval:
            created.popleft()
        if limits.session_creations_per_key and len(created) >= limits.session_creations_per_key:
            self._limit_hit(
                "session creations",
                key_id,
                now,
                "key {key!r} from {host}: {count} sessions created in {interval:g} s, the "
                "most one key may: refusing its new sessions for now{more}",
                count=len(created),
                interval=interval,
                **fields,
            )
            return wire.REJECT_TOO_MANY_SESSIONS
        created.append(now)
        self.sessions += 1
        self.sessions_of[key_id] = live + 1
        return 0

    def session_closed(self, key_id: str) -> None:
        """A session counted by :meth:`open_session` has ended."""
        self.sessions -= 1
        left = self.sessions_of[key_id] - 1
        if left:
            self.sessions_of[key_id] = left
        else:
            del self.sessions_of[key_id]

    def subflows_full(self, key_id: str, host: str, now: float, count: int) -> None:
        """Log that a session refused a subflow beyond ``--subflows``."""
        self._limit_hit(
            "subflows",
            key_id,
            now,
            "key {key!r} from {host}: its session has {count} subflows, the most one "
            "session may (--subflows): refusing more{more}",
            key=key_id,
            host=printable(host),
            count=count,
        )

    # -------------------------------------------------------------------- logs

    def _limit_hit(self, limit: str, subject: str, now: float, fmt: str, **fields: Any) -> None:
        """Log ``fmt`` unless the same limit hit the same subject less than
        ``log_interval`` ago; then count it for the next line instead."""
        suppressed = self._throttle(limit, subject).due(now)
        if suppressed is not None:
            self.log.warn(fmt, more=_more(suppressed), **fields)

    def _throttle(self, limit: str, subject: str) -> Throttle:
        """The throttle of one limit and subject, most recently used last; the
        oldest are forgotten past ``_MAX_TRACKED`` (a spray of addresses)."""
        throttles = self._throttles
        throttle = throttles.pop((limit, subject), None) or Throttle(self.limits.log_interval)
        throttles[(limit, subject)] = throttle
        while len(throttles) > _MAX_TRACKED:
            del throttles[next(iter(throttles))]
        return throttle
