"""The client end of a subflow: a thin adapter around core.handshake.ClientHandshake."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from stripeproxy.core import handshake, wire
from stripeproxy.core.handshake import ClientState, Failed, Joined, Rejected
from stripeproxy.core.redial import RedialPolicy
from stripeproxy.net.client import ClientSessionDriver, Overlay
from stripeproxy.net.dial import DialOutcome
from stripeproxy.net.routing import carries_route
from stripeproxy.net.subflow import SubflowProtocol

# Handshakes that ended without a verdict; they count as failures for the re-dial backoff.
_UNFINISHED = frozenset(
    {ClientState.AWAIT_CHALLENGE, ClientState.AWAIT_VERDICT, ClientState.FAILED}
)


class ClientSubflow(SubflowProtocol):
    """Client end of a subflow: answer the challenge, check the server's proof."""

    def __init__(
        self, overlay: Overlay, redial: RedialPolicy | None = None, path: str = ""
    ) -> None:
        settings = overlay.settings
        super().__init__(
            settings.reactor,
            settings.config.crc,
            settings.handshake_timeout,
            max_body=settings.max_frame,
            congestion=settings.congestion,
            loss_watch=settings.loss_watch,
        )
        self.overlay = overlay
        # The --path this subflow leaves by ("": no --path); the views group by it.
        self.path = path
        self.redial = redial if redial is not None else RedialPolicy()
        self.handshake = handshake.ClientHandshake(
            settings.psk, settings.key_id, settings.config.crc, self._choose_session
        )
        self._target: ClientSessionDriver | None = None
        # What net/dial.py learns from this attempt: joined, or why not.
        self.dial = DialOutcome(settings.handshake_timeout)

    @property
    def nonce(self) -> bytes:
        return self.handshake.nonce

    def _choose_session(self) -> tuple[bytes, bool]:
        """Asked at CHALLENGE time: join the overlay's current session."""
        target = self._target = self.overlay.current()
        self.dial.challenged = True
        return target.session_id, target.established

    def start_handshake(self) -> None:
        """The server speaks first (CHALLENGE); nothing to send yet."""

    def handshake_frame(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Challenge) and not carries_route(
            self.transport, self.overlay.current()
        ):
            # Our SNI names a session that ended while we dialled (SPEC.md section 2).
            self.fail("the session changed while this subflow was connecting")
            return
        outcome = self.handshake.receive(frame)
        data = self.handshake.data_to_send()
        if data:
            self.write_frame(data)
        if isinstance(outcome, Joined):
            self._joined()
        elif isinstance(outcome, Rejected):
            self._rejected(outcome)
        elif isinstance(outcome, Failed):
            self.fail(outcome.reason)

    def _joined(self) -> None:
        target = self._target
        assert target is not None
        if target.closed:
            self.fail("session ended during the handshake")
            return
        target.established = True
        self.overlay.joins += 1
        self.redial.joined()
        self.joined(target)
        self.dial.joined.callback(None)

    def _rejected(self, outcome: Rejected) -> None:
        self.dial.rejection = outcome
        target = self._target
        assert target is not None
        if outcome.code == wire.REJECT_UNKNOWN_SESSION:
            # The server restarted: its streams are gone, so are ours.
            target.close("the server no longer knows this session")
        if outcome.code == wire.REJECT_BAD_AUTH:
            # A configuration error, the same on every subflow: one clear line
            # (not one per subflow and re-dial), then a long wait between dials.
            if self.redial.bad_key():
                self.log.error(
                    "the server at {peer} rejected our key (key id {key!r}): {reason!r}; "
                    "check --psk-file and --key-id; re-dialling every {delay:g} s",
                    peer=self.peer,
                    key=self.overlay.settings.key_id,
                    reason=outcome.reason,
                    delay=self.redial.rejected_delay,
                )
            self.abort()
            return
        if outcome.code != wire.REJECT_UNKNOWN_SESSION:  # that one re-dials into a new session
            self.redial.handshake_failed()  # a limit or the version: back off
        self.fail(f"server rejected the subflow: {outcome.reason}")

    def fail(self, reason: str) -> None:
        if self.driver is None and not self._gone:
            self.dial.failure = reason
            if self.dial.watched:
                # Before the join, net/dial.py logs why: once per kind, not per attempt.
                self.abort()
                return
        super().fail(reason)

    def abort(self) -> None:
        """Close it ourselves: its slot then knows the loss is no news (with TLS the
        reason reads "connection lost", as if the network had cut it)."""
        self.dial.aborted = True
        super().abort()

    def lost(self, reason: Failure | None) -> None:
        if self.handshake.state in _UNFINISHED:
            self.redial.handshake_failed()  # timed out, a bad proof, a TLS error...
        self.handshake.lost()
        self.dial.lost(reason)


class SubflowFactory(Factory):
    """Builds a :class:`ClientSubflow` per dial; its ``redial`` policy paces the re-dials
    (pass ``redial.delay`` as the ``ClientService``'s ``retryPolicy``).

    One factory per path: a path whose handshakes fail (a black-holed
    uplink) backs its own slots off, not the other paths'.
    """

    noisy = False

    def __init__(self, overlay: Overlay, retry_max: float = 10.0, path: str = "") -> None:
        self.overlay = overlay
        self.path = path
        self.redial = RedialPolicy(max_delay=retry_max)

    def buildProtocol(self, addr: Any) -> ClientSubflow:
        return ClientSubflow(self.overlay, self.redial, self.path)
