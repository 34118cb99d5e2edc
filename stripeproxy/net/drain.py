"""Graceful server shutdown: GOAWAY, let open streams finish, then close."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
)
from twisted.logger import Logger

from stripeproxy.net.registry import SessionRegistry


class DrainService(Service):
    """Graceful shutdown (SIGTERM): GOAWAY, let open streams finish, then close.

    Added before the listener, so it stops after it: by the time it runs, no
    new subflow is accepted.  Every session sends GOAWAY and refuses new
    streams; the returned Deferred fires once no session has an open stream
    or ``timeout`` seconds have passed, and the remaining sessions are closed.
    """

    log = Logger()

    def __init__(self, registry: SessionRegistry, clock: IReactorTime, timeout: float) -> None:
        self.registry = registry
        self.clock = clock
        self.timeout = timeout

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is untyped
        sessions = list(self.registry.sessions.values())
        for driver in sessions:
            driver.go_away("the server is shutting down")
        deadline = self.clock.seconds() + self.timeout
        pending: list[IDelayedCall] = []

        def close_all() -> None:
            busy = [d for d in self.registry.sessions.values() if d.stream_count]
            if busy:
                self.log.info(
                    "drain timeout: resetting {n} open streams",
                    n=sum(d.stream_count for d in busy),
                )
            for driver in list(self.registry.sessions.values()):
                driver.close("the server is shutting down")

        def cancel(_: defer.Deferred[None]) -> None:
            for call in pending:
                if call.active():
                    call.cancel()
            close_all()

        done: defer.Deferred[None] = defer.Deferred(cancel)

        def check() -> None:
            pending.clear()
            busy = any(d.stream_count for d in self.registry.sessions.values())
            if busy and self.clock.seconds() < deadline:
                pending.append(self.clock.callLater(0.1, check))
                return
            close_all()
            done.callback(None)

        check()
        return done
