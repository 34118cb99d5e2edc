"""Plumbing shared by the two harness commands.

Both are short-lived command-line programs built on ``react``; keeping the
option, logging and exit-code conventions in one place makes them behave
alike.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorCore
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    LogEvent,
    PredicateResult,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class HarnessOptions(usage.Options):
    """Options with the ``--tui``/``--no-tui`` pair.

    Handled as methods rather than ``optFlags`` so the last one given wins,
    as with any on/off switch, and ``self["tui"]`` is always a bool.
    """

    def __init__(self) -> None:
        super().__init__()
        self["tui"] = False

    def opt_tui(self) -> None:
        """Show the live dashboard (default: off)."""
        self["tui"] = True

    def opt_no_tui(self) -> None:
        """Plain log output only."""
        self["tui"] = False


def parse_options(options: usage.Options, argv: Sequence[str] | None) -> int | None:
    """Parse ``argv`` into ``options``; return an exit code if the program should stop now.

    Usage errors go to stderr with the usage text, before logging starts,
    so they read like any other command's complaints.
    """
    program = os.path.basename(sys.argv[0]) or "harness"
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    except usage.UsageError as e:
        sys.stderr.write(f"{options}\n{program}: error: {e}\n")
        return EXIT_USAGE
    return None


_FACTORY_CHATTER = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})


def _drop_factory_chatter(event: LogEvent) -> PredicateResult:
    """Twisted logs every client connection's factory start and stop; that buries the lines
    a harness user looks for."""
    if event.get("log_format") in _FACTORY_CHATTER:
        return PredicateResult.no
    return PredicateResult.maybe


def begin_logging() -> None:
    """Send twisted.logger output to stderr, keeping stdout for results scripts parse."""
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [_drop_factory_chatter])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


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
