"""The server's per-stream records: the opt-in access log, and the debug lines.

A stream's target is the SOCKS client's choice, and a busy server opens
thousands of streams a minute: one line per stream in the main log is noise
an operator did not ask for and a flood anyone with a key can cause.  So:

- Lines about single streams (the target asked for, a failed dial) go to
  :data:`stream_log` at debug level, which keeps them out of the main log
  (``twistd`` writes every level it is given) unless :data:`stream_levels`
  lets them through.
- ``--access-log FILE`` writes one line per stream when it ends, in the fixed
  format :data:`ACCESS_FORMAT` (README "Access log").  Every value that came
  from the network is escaped (:func:`token`), so a line cannot be forged and
  splits on spaces into its fields.

The access log is a ``twisted.logger`` event (namespace ``stripeproxy.access``)
handed to an observer of its own, never to the global log: the driver only
emits fields, and any ``ILogObserver`` (a test's list, a JSON writer) can take
them.  The file writer, :class:`AccessLog`, opens the file, appends the line
and closes it again for each stream: a rotated file (``logrotate`` without
``copytruncate``) is picked up at the next line with no signal, and nothing
has to be closed at shutdown, where the drain still ends streams after the
other services have stopped.  The price, an ``open``/``close`` per stream, is
small beside the stream's own connect.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Protocol

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
)
from zope.interface import implementer

from stripeproxy.core.escape import printable

#: Per-stream lines are debug level; this predicate keeps them out of the main
#: log.  ``stream_levels.setLogLevelForNamespace("stripeproxy.streams",
#: LogLevel.debug)`` lets them through (tests do).
stream_levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
stream_log = Logger(
    namespace="stripeproxy.streams",
    observer=FilteringLogObserver(globalLogPublisher, [stream_levels]),
)


def stream_debug() -> bool:
    """Whether :data:`stream_log`'s debug lines go anywhere.

    Asked before building one: escaping the target and emitting an event
    that the filter then drops cost 17 us per stream, a tenth of what the
    server's session does with an OPEN; asking costs under 1 us.
    """
    return bool(LogLevel.debug >= stream_levels.logLevelForNamespace(stream_log.namespace))


#: One access-log line after its time stamp (README "Access log"): fields are
#: ``name=value`` separated by single spaces; no value contains a space.
ACCESS_FORMAT = (
    "session={session} key={key} client={client} stream={stream} target={target} "
    "reply={reply} result={result} up={up} down={down} duration={duration:.3f}"
)


#: The longest ``host:port`` a SOCKS5 request can name (a 255-byte name in
#: brackets, port 65535): escaped whole, never cut.
TARGET_LIMIT = 255 + len("[]:65535")


def token(value: str | bytes, limit: int = TARGET_LIMIT) -> str:
    """``value`` escaped for a log (:func:`printable`), spaces too, so that it is one field."""
    return printable(value, limit).replace(" ", "\\x20")


def access_line(event: LogEvent) -> str:
    """The file's line for an access event: UTC time with milliseconds, then the fields."""
    when = datetime.datetime.fromtimestamp(event["log_time"], datetime.UTC)
    stamp = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return f"{stamp} {formatEvent(event)}\n"


@implementer(ILogObserver)
class AccessLog:
    """Appends each access event's line to ``path`` (opened and closed per line).

    Opened once at construction, so that an unwritable path fails at start;
    later write errors (disk full) are logged once in the main log until the
    file can be written again, and the lines in between are lost.
    """

    log = Logger()

    def __init__(self, path: str) -> None:
        with open(path, "a", encoding="utf-8"):  # the error names the path as given
            pass
        self.path = os.path.abspath(path)  # twistd may change directory (--rundir)
        self._failing = False

    def __call__(self, event: LogEvent) -> None:
        line = access_line(event)
        try:
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(line)
        except OSError as e:
            if not self._failing:
                self.log.error(
                    "access log {path}: {why}; its lines are lost until it can be written",
                    path=self.path,
                    why=e.strerror or str(e),
                )
            self._failing = True
            return
        if self._failing:
            self._failing = False
            self.log.info("access log {path}: written again", path=self.path)


class _Counted(Protocol):
    """What a record reads of the stream's target connection (net.target.TargetProtocol)."""

    sent: int  # bytes written to the target
    received: int  # bytes read from the target


@dataclass
class _Record:
    target: str
    opened_at: float
    connection: _Counted | None = None


class StreamRecords:
    """One server session's streams from OPEN to their end, for the access log.

    Each OPEN gets exactly one line, however the stream ends: ``closed`` (both
    directions finished), ``reset`` (by the client, the target or the session's
    end), ``idle`` (the idle timeout), ``failed`` (the dial failed; ``reply``
    is the SOCKS reply the client got).  With no observer nothing is kept.
    """

    def __init__(
        self, observer: ILogObserver | None, session: str, key_id: str, client: str
    ) -> None:
        self._log = (
            Logger(namespace="stripeproxy.access", observer=observer)
            if observer is not None
            else None
        )
        self._open: dict[int, _Record] = {}
        # The default key's id is empty: "-", so that every field has a value.
        self._fields = {
            "session": session,
            "key": token(key_id) or "-",
            "client": token(client) or "-",
        }

    def opened(self, stream_id: int, target: str, now: float) -> None:
        if self._log is not None:
            self._open[stream_id] = _Record(target, now)

    def connected(self, stream_id: int, connection: _Counted) -> None:
        record = self._open.get(stream_id)
        if record is not None:
            record.connection = connection

    def ended(self, stream_id: int, result: str, now: float, reply: int | None = None) -> None:
        """Write the stream's line (once: later calls for it do nothing)."""
        record = self._open.pop(stream_id, None)
        if record is None or self._log is None:
            return
        connection = record.connection
        if reply is None and connection is not None:
            reply = 0  # it connected: the client got "succeeded"
        self._log.info(
            ACCESS_FORMAT,
            stream=stream_id,
            target=token(record.target),
            reply="-" if reply is None else f"0x{reply:02x}",
            result=result,
            up=connection.sent if connection is not None else 0,
            down=connection.received if connection is not None else 0,
            duration=max(0.0, now - record.opened_at),
            **self._fields,
        )
