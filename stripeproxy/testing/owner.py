"""A recorder of what a session says: the test's stand-in for the driver.

:class:`FakeOwner` pulls a session's output the way
:class:`~stripeproxy.net.driver.SessionDriver` does (:meth:`FakeOwner.drain`:
events, then frames one write at a time, until nothing is left) and records
it: the bytes written on each subflow, the bytes delivered to each stream,
EOFs, resets, closes, pause/resume, open requests and results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from stripeproxy.core import wire
from stripeproxy.core.session import (
    CloseSubflow,
    Event,
    GoingAway,
    OpenRefused,
    OpenRequested,
    OpenResult,
    Session,
    SessionClosed,
    StreamClosed,
    StreamData,
    StreamEof,
    StreamPaused,
    StreamReset,
    StreamResumed,
)


class FakeOwner:
    """Records everything a session says, as its driver would receive it.

    ``events`` keeps every event in order as a tuple whose first item names
    it (``("stream_data", stream_id, len(data))`` for data, so that the log
    stays small); the other attributes index the same events for easy
    assertions.  ``on_send`` and ``on_close_subflow`` let a network fake
    observe writes and subflow closes; ``on_data`` lets a test play a local
    peer that reacts to what it receives.  A stream the local side reset is
    :meth:`forget`-ten: later events for it are dropped, as the driver drops
    them once the local connection is gone.
    """

    def __init__(
        self,
        *,
        auto_accept: bool = False,
        accept_address: tuple[str, int] = ("127.0.0.1", 4242),
    ) -> None:
        #: The session this owner drains; needed for ``auto_accept``.
        self.session: Session | None = None
        #: Answer every OPEN with ``open_succeeded`` as soon as it is seen.
        self.auto_accept = auto_accept
        self.accept_address = accept_address
        self.events: list[tuple[object, ...]] = []
        #: Every byte written, per subflow id.
        self.sent: dict[int, bytearray] = {}
        #: Every byte delivered, per stream id.
        self.received: dict[int, bytearray] = {}
        self.eofs: list[int] = []
        self.resets: list[tuple[int, int]] = []
        self.closed_streams: list[int] = []
        self.closed_subflows: list[tuple[int, str]] = []
        self.open_requests: list[tuple[int, str, int]] = []
        self.open_results: list[tuple[int, int, str, int]] = []
        self.pauses: list[int] = []
        self.resumes: list[int] = []
        #: Streams whose local source is paused right now.
        self.paused: set[int] = set()
        self.session_closes: list[str] = []
        self.forgotten: set[int] = set()
        self.on_send: Callable[[int, bytes], None] | None = None
        self.on_close_subflow: Callable[[int, str], None] | None = None
        #: Called after each delivery is recorded: a local peer that reacts
        #: (answers, resets, pauses) to what it gets.
        self.on_data: Callable[[int, bytes], None] | None = None
        self._draining = False
        self._again = False

    # ------------------------------------------------------------- queries

    def data(self, stream_id: int) -> bytes:
        """Every byte delivered so far to ``stream_id``."""
        return bytes(self.received.get(stream_id, b""))

    def frames_sent(self, sid: int, crc: bool) -> list[wire.Frame]:
        """Decode everything written on subflow ``sid``."""
        return wire.FrameDecoder(crc).feed(bytes(self.sent.get(sid, b"")))

    def finished(self, stream_id: int) -> bool:
        """The stream ended in any way (closed, reset or refused)."""
        return (
            stream_id in self.closed_streams
            or any(s == stream_id for s, _ in self.resets)
            or any(s == stream_id and code != 0 for s, code, _, _ in self.open_results)
        )

    # ---------------------------------------------------------- the door out

    def forget(self, stream_id: int) -> None:
        """The local side let go of ``stream_id``: ignore what comes for it."""
        self.forgotten.add(stream_id)
        self.paused.discard(stream_id)

    def drain(self, now: Callable[[], float]) -> None:
        """Take the session's events and frames until it has nothing more to say.

        Inputs made meanwhile (a write that fills a subflow, a local peer
        that resets on data) only make the loop go round again.
        """
        if self._draining:
            self._again = True
            return
        session = self.session
        if session is None:
            raise RuntimeError("FakeOwner.drain needs FakeOwner.session")
        self._draining = True
        try:
            while True:
                self._again = False
                for event in session.events():
                    self.handle(event, now())
                while (out := session.next_transmit(now())) is not None:
                    self.record_send(*out)
                if not (self._again or session.has_events):
                    return
        finally:
            self._draining = False

    def record_send(self, sid: int, pieces: Sequence[bytes]) -> None:
        data = b"".join(pieces)
        self.events.append(("send", sid, len(data)))
        self.sent.setdefault(sid, bytearray()).extend(data)
        if self.on_send is not None:
            self.on_send(sid, data)

    def handle(self, event: Event, now: float) -> None:
        """Record one event (see the class docstring)."""
        if isinstance(event, CloseSubflow):
            self.events.append(("close_subflow", event.sid, event.reason))
            self.closed_subflows.append((event.sid, event.reason))
            if self.on_close_subflow is not None:
                self.on_close_subflow(event.sid, event.reason)
        elif isinstance(event, SessionClosed):
            self.events.append(("session_closed", event.reason))
            self.session_closes.append(event.reason)
        elif isinstance(event, GoingAway):
            self.events.append(("session_going_away", event.reason))
        elif isinstance(event, OpenRefused):
            self.events.append(("stream_open_refused", event.stream_id, event.streams))
        elif event.stream_id in self.forgotten:
            return
        elif isinstance(event, StreamData):
            self.events.append(("stream_data", event.stream_id, len(event.data)))
            self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
            if self.on_data is not None:
                self.on_data(event.stream_id, event.data)
        else:
            self._stream_event(event, now)

    def _stream_event(
        self,
        event: OpenRequested
        | OpenResult
        | StreamEof
        | StreamReset
        | StreamClosed
        | StreamPaused
        | StreamResumed,
        now: float,
    ) -> None:
        stream_id = event.stream_id
        if isinstance(event, OpenRequested):
            self.events.append(("stream_open_requested", stream_id, event.host, event.port))
            self.open_requests.append((stream_id, event.host, event.port))
            if self.auto_accept:
                assert self.session is not None
                self.session.open_succeeded(stream_id, *self.accept_address, now)
        elif isinstance(event, OpenResult):
            self.events.append(
                ("stream_open_result", stream_id, event.code, event.host, event.port)
            )
            self.open_results.append((stream_id, event.code, event.host, event.port))
        elif isinstance(event, StreamEof):
            self.events.append(("stream_eof", stream_id))
            self.eofs.append(stream_id)
        elif isinstance(event, StreamReset):
            self.events.append(("stream_reset", stream_id, event.code))
            self.resets.append((stream_id, event.code))
            self.paused.discard(stream_id)
        elif isinstance(event, StreamClosed):
            self.events.append(("stream_closed", stream_id))
            self.closed_streams.append(stream_id)
            self.paused.discard(stream_id)
        elif isinstance(event, StreamPaused):
            self.events.append(("stream_pause", stream_id))
            self.pauses.append(stream_id)
            self.paused.add(stream_id)
        else:
            self.events.append(("stream_resume", stream_id))
            self.resumes.append(stream_id)
            self.paused.discard(stream_id)
