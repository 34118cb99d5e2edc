"""The server end of a subflow: a thin adapter around core.handshake.ServerHandshake.

Admission (the handshake pool, the delay a failing source waits before its
CHALLENGE, per-key quotas) is decided by the registry's pure
:class:`~stripeproxy.core.admission.Admission`; the handshake itself by the
sans-I/O :class:`~stripeproxy.core.handshake.ServerHandshake`.  This class
feeds both and does the I/O: write, close, wait.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, ISSLTransport
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from stripeproxy.core import handshake, wire
from stripeproxy.core.handshake import Failed, Joined, Outcome, Proven, Rejected
from stripeproxy.net.driver import SessionDriver
from stripeproxy.net.registry import SessionRegistry
from stripeproxy.net.server import ServerSettings
from stripeproxy.net.subflow import SubflowProtocol


class ServerSubflow(SubflowProtocol):
    """Server end of a subflow: challenge, verify the proof, join a session."""

    def __init__(self, settings: ServerSettings, registry: SessionRegistry) -> None:
        super().__init__(
            settings.reactor,
            settings.config.crc,
            settings.handshake_timeout,
            max_body=settings.max_frame,
            congestion=settings.congestion,
            loss_watch=settings.loss_watch,
        )
        self.settings = settings
        self.registry = registry
        self.handshake = handshake.ServerHandshake(settings.keys, settings.config.crc)
        self._slot: str | None = None  # the address whose handshake-pool slot we hold
        self._wait: IDelayedCall | None = None  # a CHALLENGE or AUTH held back

    @property
    def nonce(self) -> bytes:
        return self.handshake.nonce

    @property
    def peer_host(self) -> str:
        assert self.transport is not None
        return str(getattr(self.transport.getPeer(), "host", ""))

    def start_handshake(self) -> None:
        host = self.peer_host
        delay = self.registry.admission.begin_handshake(host, self.registry.now())
        if delay is None:
            self.abort()  # the pool (or this address's share) is full: not even a challenge
            return
        self._slot = host
        self._after(delay, self._challenge)

    def _challenge(self) -> None:
        self.handshake.start()
        self.write_frame(self.handshake.data_to_send())

    def _after(self, delay: float, then: Callable[[], None]) -> None:
        """Run ``then`` now, or after ``delay`` seconds (a failing source's penalty)."""
        if delay <= 0:
            then()
            return

        def fire() -> None:
            self._wait = None
            then()

        self._wait = self.clock.callLater(delay, fire)

    def handshake_frame(self, frame: wire.Frame) -> None:
        host = self.peer_host
        if isinstance(frame, wire.Auth) and host != self._slot:
            # Behind a PROXY-protocol balancer the client's own address is only
            # known now, after the CHALLENGE went out: its penalty delays the
            # answer instead.
            delay = self.registry.admission.challenge_delay(host, self.registry.now())
            self._slot_moved(host)
            if delay > 0:
                self.pause_handshake()
                self._after(delay, lambda: self._auth_after_hold(frame))
                return
        self._act(self.handshake.receive(frame))

    def _slot_moved(self, host: str) -> None:
        """Count the pool slot against the address the PROXY header named."""
        if self._slot is not None:
            self.registry.admission.move_handshake(self._slot, host)
            self._slot = host

    def _auth_after_hold(self, frame: wire.Frame) -> None:
        self._act(self.handshake.receive(frame))
        if not self._gone:
            self.resume_handshake()

    def _act(self, outcome: Outcome | None) -> None:
        """Do what the handshake's outcome asks; send what it queued."""
        registry = self.registry
        if isinstance(outcome, Proven):
            driver, code = registry.attach(
                outcome.key_id, outcome.session_id, outcome.flags, self.peer_host
            )
            if driver is None:
                outcome = self.handshake.refused(code)
            else:
                outcome = self.handshake.attached(code)
                self.write_frame(self.handshake.data_to_send())
                self.joined(driver)
                return
        data = self.handshake.data_to_send()
        if isinstance(outcome, Rejected):
            if outcome.code == wire.REJECT_BAD_AUTH:
                registry.admission.auth_failed(
                    self.peer_host, self.handshake.key_id, registry.now(), self.peer
                )
            self._reject(data)
        elif isinstance(outcome, Failed):
            self.fail(outcome.reason)
        else:
            assert outcome is None or isinstance(outcome, Joined)
            self.write_frame(data)

    def _reject(self, data: bytes) -> None:
        """Send REJECT and close; the handshake timer aborts the connection
        if the peer does not let it close (a TLS close waits for the peer)."""
        self._handshake_over()  # its slot is free at once, whatever the peer does
        self.write_frame(data)
        self._gone = True
        assert self.transport is not None
        self.transport.loseConnection()

    def _handshake_over(self) -> None:
        if self._wait is not None and self._wait.active():
            self._wait.cancel()
        self._wait = None
        if self._slot is not None:
            self.registry.admission.end_handshake(self._slot)
            self._slot = None

    def joined(self, driver: SessionDriver) -> None:
        self._handshake_over()
        super().joined(driver)

    def lost(self, reason: Failure | None) -> None:
        self.handshake.lost()
        self._handshake_over()

    def timeout_hint(self) -> str:
        if ISSLTransport.providedBy(self.transport):
            return ": no TLS ClientHello or no AUTH (a client with --no-tls?)"
        return ": no AUTH from the client"


class SubflowFactory(Factory):
    """Builds a :class:`ServerSubflow` per accepted connection."""

    noisy = False

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.registry = SessionRegistry(settings)

    def buildProtocol(self, addr: Any) -> ServerSubflow:
        return ServerSubflow(self.settings, self.registry)
