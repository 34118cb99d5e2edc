"""The client end of a subflow: answer the challenge, check the server's proof."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory

from stripeproxy.core import handshake, wire
from stripeproxy.net.client import ClientSessionDriver, Overlay
from stripeproxy.net.subflow import SubflowProtocol


class ClientSubflow(SubflowProtocol):
    """Client end of a subflow: answer the challenge, check the server's proof."""

    def __init__(self, overlay: Overlay) -> None:
        settings = overlay.settings
        super().__init__(
            settings.reactor,
            settings.config.crc,
            settings.handshake_timeout,
            max_body=settings.max_frame,
            congestion=settings.congestion,
        )
        self.overlay = overlay
        self.nonce = handshake.new_nonce()
        self._target: ClientSessionDriver | None = None
        self._server_nonce = b""
        self._flags = 0

    def start_handshake(self) -> None:
        """The server speaks first (CHALLENGE); nothing to send yet."""

    def handshake_frame(self, frame: wire.Frame) -> None:
        settings = self.overlay.settings
        if self._target is None:
            if not isinstance(frame, wire.Challenge):
                raise wire.ProtocolError(f"expected CHALLENGE, got {type(frame).__name__}")
            if frame.version != wire.PROTOCOL_VERSION:
                raise wire.ProtocolError(f"server speaks protocol version {frame.version}")
            self._server_nonce = frame.nonce
            self._target = self.overlay.current()
            self._flags = wire.AUTH_JOIN_ONLY if self._target.established else 0
            session_id = self._target.session_id
            mac = handshake.client_proof(
                settings.psk, frame.nonce, self.nonce, session_id, self._flags, settings.key_id
            )
            auth = wire.Auth(
                wire.PROTOCOL_VERSION, self.nonce, session_id, self._flags, settings.key_id, mac
            )
            self.write_frame(wire.encode_auth(auth, self.crc))
            return
        target = self._target
        if isinstance(frame, wire.Reject):
            if frame.code == wire.REJECT_UNKNOWN_SESSION:
                # The server restarted: its streams are gone, so are ours.
                target.close("the server no longer knows this session")
            self.fail(f"server rejected the subflow: {frame.reason or frame.code}")
            return
        if not isinstance(frame, wire.Welcome):
            raise wire.ProtocolError(f"expected WELCOME, got {type(frame).__name__}")
        expected = handshake.server_proof(
            settings.psk, self._server_nonce, self.nonce, target.session_id, frame.flags
        )
        if not handshake.proofs_equal(expected, frame.mac):
            self.fail("the server could not prove it holds the key; check --psk-file")
            return
        if target.closed:
            self.fail("session ended during the handshake")
            return
        if target.established and frame.flags & wire.WELCOME_CREATED:
            raise wire.ProtocolError("server created a session we asked to join")
        target.established = True
        self.overlay.joins += 1
        self.joined(target)


class SubflowFactory(Factory):
    noisy = False

    def __init__(self, overlay: Overlay) -> None:
        self.overlay = overlay

    def buildProtocol(self, addr: Any) -> ClientSubflow:
        return ClientSubflow(self.overlay)
