"""The server end of a subflow: challenge, verify the proof, join a session."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from stripeproxy.core import handshake, wire
from stripeproxy.net.driver import SessionDriver
from stripeproxy.net.registry import SessionRegistry
from stripeproxy.net.server import ServerSettings
from stripeproxy.net.subflow import SubflowProtocol

_REJECT_REASONS = {
    wire.REJECT_BAD_AUTH: "authentication failed",
    wire.REJECT_UNKNOWN_SESSION: "unknown session",
    wire.REJECT_TOO_MANY_SUBFLOWS: "too many subflows in this session",
    wire.REJECT_TOO_MANY_SESSIONS: "too many sessions",
    wire.REJECT_VERSION: "unsupported protocol version",
}


class ServerSubflow(SubflowProtocol):
    """Server end of a subflow: challenge, verify the proof, join a session."""

    def __init__(self, settings: ServerSettings, registry: SessionRegistry) -> None:
        super().__init__(
            settings.reactor,
            settings.config.crc,
            settings.handshake_timeout,
            max_body=settings.max_frame,
            congestion=settings.congestion,
        )
        self.settings = settings
        self.registry = registry
        self.nonce = handshake.new_nonce()
        self._handshaking = False
        self._host = ""

    def start_handshake(self) -> None:
        registry = self.registry
        if registry.guard.blocked(self.peer_host):
            self.abort()  # too many failures: not even a challenge
            return
        if registry.handshaking >= self.settings.max_handshakes:
            # A flood of connections that never authenticate must not grow
            # memory without bound; established subflows are not affected.
            if not registry.handshakes_full:
                registry.handshakes_full = True
                self.log.warn(
                    "{count} subflows are authenticating at once: refusing new "
                    "connections until some finish (--max-handshakes)",
                    count=registry.handshaking,
                )
            self.abort()
            return
        host = self.peer_host
        share = self.settings.handshakes_per_address
        if share and registry.handshaking_from.get(host, 0) >= share:
            # One address may not take the whole pool and lock everybody out.
            if host not in registry.addresses_full:
                registry.addresses_full.add(host)
                self.log.warn(
                    "{host} has {share} subflows authenticating at once: refusing its new "
                    "connections until some finish",
                    host=host,
                    share=share,
                )
            self.abort()
            return
        registry.handshaking += 1
        registry.handshaking_from[host] = registry.handshaking_from.get(host, 0) + 1
        self._handshaking = True
        self._host = host
        self.write_frame(wire.encode_challenge(self.nonce, self.crc))

    def _handshake_over(self) -> None:
        if self._handshaking:
            self._handshaking = False
            registry = self.registry
            registry.handshaking -= 1
            if registry.handshaking < max(1, self.settings.max_handshakes // 2):
                registry.handshakes_full = False
            left = registry.handshaking_from[self._host] - 1
            if left:
                registry.handshaking_from[self._host] = left
            else:
                del registry.handshaking_from[self._host]
                registry.addresses_full.discard(self._host)

    def joined(self, driver: SessionDriver) -> None:
        self._handshake_over()
        super().joined(driver)

    def lost(self, reason: Failure | None) -> None:
        self._handshake_over()

    @property
    def peer_host(self) -> str:
        assert self.transport is not None
        return str(getattr(self.transport.getPeer(), "host", ""))

    def handshake_frame(self, frame: wire.Frame) -> None:
        if not isinstance(frame, wire.Auth):
            raise wire.ProtocolError(f"expected AUTH, got {type(frame).__name__}")
        if self.registry.guard.blocked(self.peer_host):
            # Checked again here: behind a PROXY-protocol load balancer the
            # client's own address is only known once the header has arrived.
            self.reject(wire.REJECT_BAD_AUTH)
            return
        if frame.version != wire.PROTOCOL_VERSION:
            self.reject(wire.REJECT_VERSION)
            return
        psk = self.settings.keys.get(frame.key_id)
        expected = handshake.client_proof(
            psk or b"\0" * 32, self.nonce, frame.nonce, frame.session_id, frame.flags, frame.key_id
        )
        if not handshake.proofs_equal(expected, frame.mac) or psk is None:
            guard = self.registry.guard
            count = guard.failed(self.peer_host)
            if count <= guard.limit:
                self.log.warn(
                    "subflow {peer}: authentication failed (key id {key!r}); "
                    "{count} of {limit} allowed in {window:g} s{more}",
                    peer=self.peer,
                    key=frame.key_id,
                    count=count,
                    limit=guard.limit,
                    window=guard.window,
                    more="; refusing this address for now" if count == guard.limit else "",
                )
            self.reject(wire.REJECT_BAD_AUTH)
            return
        driver, code = self.registry.attach(frame.key_id, frame.session_id, frame.flags)
        if driver is None:
            self.reject(code)
            return
        proof = handshake.server_proof(psk, self.nonce, frame.nonce, frame.session_id, code)
        self.write_frame(wire.encode_welcome(wire.Welcome(code, proof), self.crc))
        self.joined(driver)

    def reject(self, code: int) -> None:
        """Send REJECT and close; the handshake timer aborts the connection
        if the peer does not let it close (a TLS close waits for the peer)."""
        self._handshake_over()  # its slot is free at once, whatever the peer does
        self.write_frame(wire.encode_reject(code, _REJECT_REASONS.get(code, ""), self.crc))
        self._gone = True
        assert self.transport is not None
        self.transport.loseConnection()


class SubflowFactory(Factory):
    """Builds a :class:`ServerSubflow` per accepted connection."""

    noisy = False

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.registry = SessionRegistry(settings)

    def buildProtocol(self, addr: Any) -> ServerSubflow:
        return ServerSubflow(self.settings, self.registry)
