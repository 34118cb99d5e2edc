"""What a session tells its driver, pulled with :meth:`Session.events`.

The core queues these instead of calling out (h11's ``next_event()``): the
driver takes them after each input, in one place, and acts on them.  Frames to
send are pulled separately, one at a time (:meth:`Session.next_transmit`), so
that a subflow pausing mid-write steers the next chunk elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OpenRequested:
    """Server only: connect stream ``stream_id`` to host:port."""

    stream_id: int
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class OpenResult:
    """Client only: the server answered an OPEN (code 0 means connected)."""

    stream_id: int
    code: int
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class OpenRefused:
    """Server only: an OPEN was refused because the session holds ``streams``
    streams, its limit (``max_streams``); the driver logs it."""

    stream_id: int
    streams: int


@dataclass(frozen=True, slots=True)
class StreamData:
    """In-order bytes for the local peer of ``stream_id``."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEof:
    """The remote direction has ended: half-close the local peer's write side."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream was aborted: abort the local peer."""

    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """Both directions finished cleanly: close the local peer."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamPaused:
    """Stop reading the local peer: the stream's send buffer is full."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamResumed:
    """Resume reading the local peer."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class GoingAway:
    """The peer sent GOAWAY: open no new streams here; existing ones go on."""

    reason: str


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """The session is over (grace period expired, protocol error, or closed)."""

    reason: str


@dataclass(frozen=True, slots=True)
class CloseSubflow:
    """Drop subflow ``sid`` (protocol error, heartbeat silence, session over)."""

    sid: int
    reason: str


Event = (
    OpenRequested
    | OpenResult
    | OpenRefused
    | StreamData
    | StreamEof
    | StreamReset
    | StreamClosed
    | StreamPaused
    | StreamResumed
    | GoingAway
    | SessionClosed
    | CloseSubflow
)
