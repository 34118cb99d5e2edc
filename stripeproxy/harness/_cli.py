"""Plumbing shared by the two harness commands.

Both are short-lived command-line programs built on ``react``; keeping the
option, logging and exit-code conventions in one place makes them behave
alike.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final, TextIO

from twisted.internet.interfaces import IReactorCore
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    PredicateResult,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage
from zope.interface import implementer

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class HarnessOptions(usage.Options):
    """Options with the ``--tui``/``--no-tui`` pair.

    As with the proxy's ``--tui``, the dashboard is on by default only when
    stdout is a terminal: piped into a script, the harness prints plain
    lines and nothing else. Handled as methods rather than ``optFlags`` so
    the last one given wins, as with any on/off switch; after parsing,
    ``self["tui"]`` is always a bool. Subclasses that define
    ``postOptions`` must call this one.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # usage.Options is untyped
        self["tui"] = None  # not given: decided in postOptions

    def opt_tui(self) -> None:
        """Show the live dashboard (default: when stdout is a terminal)."""
        self["tui"] = True

    def opt_no_tui(self) -> None:
        """Never show the live dashboard; plain log output only."""
        self["tui"] = False

    def postOptions(self) -> None:
        if self["tui"] is None:
            self["tui"] = isatty(sys.stdout)


def isatty(stream: object) -> bool:
    """Whether ``stream`` is a terminal; False for anything without a working ``isatty``."""
    check = getattr(stream, "isatty", None)
    try:
        return bool(check()) if check is not None else False
    except ValueError:  # closed
        return False


def parse_options(options: usage.Options, argv: Sequence[str] | None) -> int | None:
    """Parse ``argv`` into ``options``; return an exit code if the program should stop now.

    Usage errors go to stderr with the usage text, before logging starts,
    so they read like any other command's complaints.
    """
    program = os.path.basename(sys.argv[0]) or "harness"
    try:
        options.parseOptions(  # type: ignore[no-untyped-call]  # usage.Options is untyped
            list(sys.argv[1:] if argv is None else argv)
        )
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    except usage.UsageError as e:
        sys.stderr.write(f"{options}\n{program}: error: {e}\n")
        return EXIT_USAGE
    return None


_FACTORY_CHATTER = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})


@implementer(ILogFilterPredicate)
class _DropFactoryChatter:
    """Twisted logs every client connection's factory start and stop; that buries the lines
    a harness user looks for (on stderr and in the dashboards' log panels).

    A class rather than a function so that it provides ``ILogFilterPredicate``
    (which ``FilteringLogObserver`` is typed to take); it holds no state.
    """

    def __call__(self, event: LogEvent) -> object:
        """``PredicateResult.no`` or ``.maybe``: constants of the untyped ``constantly``
        package (so typed ``object`` here, as ``Any`` in ``ILogFilterPredicate``)."""
        if event.get("log_format") in _FACTORY_CHATTER:
            return PredicateResult.no
        return PredicateResult.maybe


drop_factory_chatter: Final = _DropFactoryChatter()


HELD_LOG_LIMIT: Final = 10_000


@implementer(ILogObserver)
class StderrLog:
    """The harness's log on stderr, which a dashboard can hold back while it owns the screen.

    A log line written to the terminal under a live display tears it, and
    a line the dashboard swallowed would be missing from the scrollback
    afterwards. So while held, events are kept (the newest
    :data:`HELD_LOG_LIMIT`) and written out in order on release, once the
    display has stopped; the dashboard shows the latest ones in its panel
    meanwhile.
    """

    def __init__(self, out: TextIO, limit: int = HELD_LOG_LIMIT) -> None:
        self._write = FilteringLogObserver(textFileLogObserver(out), [drop_factory_chatter])
        self._limit = limit
        self._held: deque[LogEvent] | None = None
        self._dropped = 0

    @property
    def holding(self) -> bool:
        return self._held is not None

    def __call__(self, event: LogEvent) -> None:
        if self._held is None:
            self._write(event)
            return
        if len(self._held) == self._limit:
            self._dropped += 1
        self._held.append(event)

    def hold(self) -> None:
        """Keep events instead of writing them, until :meth:`release`."""
        if self._held is None:
            self._held = deque(maxlen=self._limit)
            self._dropped = 0

    def release(self) -> None:
        """Write the held events, then write new ones as they come."""
        held, self._held = self._held, None
        if held is None:
            return
        if self._dropped:
            self._write(
                {
                    "log_format": "({dropped} earlier log lines dropped while the dashboard ran)",
                    "dropped": self._dropped,
                    "log_namespace": __name__,
                    "log_time": time.time(),
                }
            )
        for event in held:
            self._write(event)


def begin_logging() -> StderrLog:
    """Send twisted.logger output to stderr, keeping stdout for results scripts parse."""
    log = StderrLog(sys.stderr)
    globalLogBeginner.beginLoggingTo([log], redirectStandardIO=False)
    return log


def run(
    body: Callable[..., Coroutine[Any, Any, int]],
    *args: object,
) -> int:
    """Run ``body(reactor, *args)`` under ``react`` and return its exit code.

    ``react`` ends with ``sys.exit``; catching that here lets ``main`` return
    an int as console-script entry points expect. A non-zero code from
    ``body`` becomes ``SystemExit`` so react does not log it as a crash.
    """

    async def wrapper(reactor: IReactorCore) -> None:
        code = await body(reactor, *args)
        if code:
            raise SystemExit(code)

    try:
        react(wrapper)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_FAILURE
    return EXIT_OK  # pragma: no cover - react always exits
