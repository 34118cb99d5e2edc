"""A Twisted client endpoint that reaches its destination through a SOCKS5 proxy.

The consumer must be able to talk to the proxy under test without a
third-party SOCKS library, and must let the *proxy* resolve names (that is
what ``curl --socks5-hostname`` does, and what the overlay is built for), so
the CONNECT carries a domain-name address whenever the destination is not an
IP literal.

Only the CONNECT command with "no authentication" (RFC 1928) is supported:
that is all the harness needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from twisted.internet.address import HostnameAddress
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import NoProtocol
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from stripeproxy.core.address import AddressError, decode_address, encode_address

__all__ = ["REPLY_MEANINGS", "SOCKS5ClientEndpoint", "SOCKS5Error"]

_VERSION: Final = 0x05
_NO_AUTH: Final = 0x00
_NO_ACCEPTABLE_METHOD: Final = 0xFF
_CONNECT: Final = 0x01
_GREETING: Final = bytes((_VERSION, 1, _NO_AUTH))

# RFC 1928 section 6.
REPLY_MEANINGS: Final[dict[int, str]] = {
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}


class SOCKS5Error(Exception):
    """The proxy did not set up the connection.

    ``reply_code`` is the REP byte of the proxy's answer when it sent one
    (e.g. 0x05 when the destination refused), and None when the handshake
    broke down before that (wrong protocol, closed connection, timeout).
    """

    def __init__(self, message: str, reply_code: int | None = None) -> None:
        super().__init__(message)
        self.reply_code = reply_code


def _format_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(IStreamClientEndpoint)
class SOCKS5ClientEndpoint:
    """Connect to ``host:port`` by asking the SOCKS5 proxy at ``proxy`` to do it.

    ``proxy`` is any endpoint that reaches the proxy (usually a
    ``HostnameEndpoint``). The Deferred from :meth:`connect` fires with the
    caller's protocol only once the proxy reports success, so callers see
    exactly the behaviour of a direct connection: either a live byte stream
    to the destination or a failure. Errors connecting to the proxy itself
    are passed through unchanged, so callers can tell "proxy unreachable"
    from :class:`SOCKS5Error` ("proxy could not reach the destination").

    With ``timeout`` (seconds, needs ``clock``), the whole attempt (TCP
    connect and handshake) is abandoned after that long; a proxy that
    accepts the connection but never answers would otherwise hang the
    caller forever.
    """

    def __init__(
        self,
        proxy: IStreamClientEndpoint,
        host: str,
        port: int,
        *,
        clock: IReactorTime | None = None,
        timeout: float | None = None,
    ) -> None:
        if timeout is not None and clock is None:
            raise ValueError("a timeout needs a clock")
        self._proxy = proxy
        self._host = host
        self._port = port
        self._deadline = (timeout, clock) if timeout is not None and clock is not None else None
        try:
            # Fail at construction, not mid-handshake, for names that cannot be sent.
            address = encode_address(host, port)
        except AddressError as e:
            raise ValueError(f"cannot ask a SOCKS5 proxy for {host!r}: {e}") from None
        self._request = bytes((_VERSION, _CONNECT, 0x00)) + address

    def __repr__(self) -> str:
        target = _format_host(self._host, self._port)
        return f"<SOCKS5ClientEndpoint to {target} via {self._proxy!r}>"

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        handshake: _Handshake | None = None

        def cancel(_: Deferred[IProtocol]) -> None:
            # Deferred.cancel() errbacks ``result`` with CancelledError after this
            # returns, unless tearing down the attempt already failed it.
            if handshake is not None and handshake.transport is not None:
                handshake.connection.abortConnection()
            else:
                connecting.cancel()

        result: Deferred[IProtocol] = Deferred(cancel)

        def build() -> _Handshake:
            nonlocal handshake
            handshake = _Handshake(self._request, self._host, self._port, protocolFactory, result)
            return handshake

        def connect_failed(failure: Failure) -> None:
            if not result.called:
                result.errback(failure)

        connecting = self._proxy.connect(_HandshakeFactory(build))
        connecting.addCallbacks(lambda _: None, connect_failed)
        if self._deadline is not None:
            timeout, clock = self._deadline
            target = _format_host(self._host, self._port)

            def timed_out(value: IProtocol | Failure, _: float) -> IProtocol | Failure:
                if isinstance(value, Failure) and value.check(CancelledError):  # type: ignore[no-untyped-call]
                    raise SOCKS5Error(
                        f"no SOCKS5 connection to {target} within {timeout:g} s "
                        "(the proxy did not answer in time)"
                    )
                return value

            result.addTimeout(timeout, clock, onTimeoutCancel=timed_out)
        return result


class _HandshakeFactory(Factory):
    """Builds the single handshake protocol of one :meth:`SOCKS5ClientEndpoint.connect`."""

    def __init__(self, build: Callable[[], _Handshake]) -> None:
        self._build = build

    def buildProtocol(self, addr: IAddress | None) -> _Handshake:
        return self._build()


class _Handshake(Protocol):
    """Speaks SOCKS5 until the proxy says CONNECTED, then relays for the real protocol.

    Staying in place as a pass-through (rather than swapping the transport's
    protocol) works for every transport, including TLS ones; the real
    protocol still writes straight to the transport.
    """

    transport: ITCPTransport | None
    """The connection to the proxy: a TCP (or TLS over TCP) one, so it can be aborted."""

    def __init__(
        self,
        request: bytes,
        host: str,
        port: int,
        factory: IProtocolFactory,
        result: Deferred[IProtocol],
    ) -> None:
        self._request = request
        self._host = host
        self._port = port
        self._factory = factory
        self._result = result
        self._buffer = bytearray()
        self._sent_request = False
        self._inner: IProtocol | None = None

    @property
    def connection(self) -> ITCPTransport:
        """The transport, once connected (every caller runs after ``connectionMade``)."""
        transport = self.transport
        assert transport is not None, "the handshake is not connected yet"
        return transport

    def connectionMade(self) -> None:
        if self._result.called:  # cancelled or timed out while connecting
            self.connection.abortConnection()
            return
        self.connection.write(_GREETING)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._result.called:
            return
        self._buffer += data
        try:
            self._advance()
        except SOCKS5Error as e:
            self._result.errback(e)
            self.connection.abortConnection()

    def _advance(self) -> None:
        if not self._sent_request:
            if len(self._buffer) < 2:
                return
            version, method = self._buffer[0], self._buffer[1]
            del self._buffer[:2]
            self._check_version(version)
            if method == _NO_ACCEPTABLE_METHOD:
                raise SOCKS5Error(
                    "the SOCKS5 proxy requires authentication "
                    "(it accepted none of the offered methods: only 'no authentication')"
                )
            if method != _NO_AUTH:
                raise SOCKS5Error(
                    f"the SOCKS5 proxy chose authentication method {method:#04x}, "
                    "which was not offered"
                )
            self.connection.write(self._request)
            self._sent_request = True
        # Reply: VER REP RSV ATYP BND.ADDR BND.PORT
        if len(self._buffer) < 2:
            return
        self._check_version(self._buffer[0])
        code = self._buffer[1]
        if code != 0x00:
            # Decide now: a proxy may close right after a failure reply, or
            # send a truncated address with it.
            meaning = REPLY_MEANINGS.get(code, "unassigned reply code")
            raise SOCKS5Error(
                f"the SOCKS5 proxy could not connect to {_format_host(self._host, self._port)}: "
                f"reply {code:#04x} ({meaning})",
                reply_code=code,
            )
        try:
            bound = decode_address(self._buffer, 3)
        except AddressError as e:
            raise SOCKS5Error(f"malformed SOCKS5 reply from the proxy: {e}") from None
        if bound is None:
            return
        rest = bytes(self._buffer[bound[2] :])
        self._buffer.clear()
        self._start_inner(rest)

    @staticmethod
    def _check_version(version: int) -> None:
        if version != _VERSION:
            raise SOCKS5Error(
                f"the proxy does not speak SOCKS5 (version byte {version:#04x} in its answer)"
            )

    def _start_inner(self, early_data: bytes) -> None:
        inner = self._factory.buildProtocol(HostnameAddress(self._host.encode(), self._port))
        if inner is None:
            self._result.errback(NoProtocol())
            self.connection.loseConnection()
            return
        self._inner = inner
        inner.makeConnection(self.connection)
        self._result.callback(inner)
        if early_data:
            inner.dataReceived(early_data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif not self._result.called:
            self._result.errback(
                SOCKS5Error(
                    "the SOCKS5 proxy closed the connection before answering "
                    f"({reason.getErrorMessage()})"
                )
            )
