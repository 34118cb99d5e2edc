"""The TLS transport under a subflow: Twisted's, with fewer calls per chunk.

Twisted's :class:`~twisted.protocols.tls.TLSMemoryBIOProtocol` hands OpenSSL
at most 16 KiB per ``SSL_write`` (copying a slice each time) and drains the
outgoing memory BIO after each, 32 KiB at a time; on the way in it delivers
one TLS record (at most 16 KiB) per ``dataReceived``.  A subflow moves whole
DATA frames of 64 KiB, so a frame cost five ``SSL_write`` calls, five BIO
reads and five writes to the TCP transport going out (the 18-byte frame
header tips it into a fifth record) and four decoder feeds coming in.  The
bench's profile put a quarter of the client's CPU there.

:class:`SubflowTLSTransport` gives OpenSSL the whole write at once (OpenSSL
still cuts 16 KiB records: the wire is the same TLS), drains the BIO in one
read, and hands the protocol everything one TCP read decrypted to in one
call.  Everything else -- handshake, shutdown, producers, the aggregation of
small writes -- is Twisted's own code, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

#: Bytes taken out of the outgoing BIO per read: a 64 KiB frame's records
#: (plus their 22-byte overhead each) fit in one.
SEND_BIO_READ = 128 * 1024
#: OpenSSL's SSL_MODE_ENABLE_PARTIAL_WRITE (pyOpenSSL exports no name for it).
_MODE_ENABLE_PARTIAL_WRITE = 0x1

try:
    # pyOpenSSL's binding of SSL_clear_mode: not public API, hence the fallback.
    from OpenSSL._util import lib as _openssl

    _clear_mode: Callable[[Any, int], int] | None = _openssl.SSL_clear_mode
except (ImportError, AttributeError):  # pragma: no cover - other pyOpenSSL versions
    _clear_mode = None
#: Plaintext asked of OpenSSL per ``SSL_read``; it returns one record at most.
RECEIVE_READ = 64 * 1024


class SubflowTLSTransport(BufferingTLSTransport):
    """Twisted's buffering TLS transport, with one ``SSL_write`` per write and
    one ``dataReceived`` per TCP read (see the module docstring)."""

    def makeConnection(self, transport: ITransport) -> None:
        """Start TLS as Twisted does, with partial writes off.

        pyOpenSSL turns partial writes on in every context, so ``SSL_write``
        returns after each 16 KiB record and a 64 KiB frame takes five calls.
        A memory BIO takes any amount, so no write is ever partial for want of
        room; without the mode one call takes the frame.  (The context cannot
        be changed once in use, so the mode goes off per connection; where
        pyOpenSSL does not offer that, :meth:`_write` loops as before.)
        """
        super().makeConnection(transport)  # type: ignore[no-untyped-call]
        if _clear_mode is not None:
            _clear_mode(self._tlsConnection._ssl, _MODE_ENABLE_PARTIAL_WRITE)

    def _write(self, data: bytes) -> None:
        """Give OpenSSL all of ``data``, then pass the records it made to the
        TCP transport in one write."""
        if self._lostTLSConnection:
            return
        sent = 0
        total = len(data)
        connection = self._tlsConnection
        while sent < total:
            try:
                # One call unless the connection still has partial writes on
                # (then OpenSSL returns after each record; see SubflowTLSFactory).
                sent += connection.send(data if not sent else memoryview(data)[sent:])
            except WantReadError:
                # A renegotiation waits for the peer: Twisted's own buffer holds
                # the rest (and pauses the producer) until then.
                self._bufferedWrite(data[sent:])  # type: ignore[no-untyped-call]
                break
            except Error:
                # As Twisted does: the TLS connection is broken; closing the
                # transport tells the protocol why (this flushes any alert).
                self._tlsShutdownFinished(Failure())  # type: ignore[no-untyped-call]
                return
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        """Pass everything in the outgoing BIO on, in as few writes as it takes."""
        connection = self._tlsConnection
        transport = self.transport
        assert transport is not None  # connected: we are flushing what it will carry
        while True:
            try:
                data = connection.bio_read(SEND_BIO_READ)
            except WantReadError:
                return  # nothing (more) there
            transport.write(data)
            if len(data) < SEND_BIO_READ:
                return  # a memory BIO hands over all it holds, up to the size asked

    def _flushReceiveBIO(self) -> None:
        """Decrypt every record the last TCP read completed, then deliver the
        plaintext to the protocol in one call (Twisted delivers each record)."""
        received: list[bytes] = []
        failure: Failure | None = None
        closed = False
        connection = self._tlsConnection
        while not self._lostTLSConnection:
            try:
                received.append(connection.recv(RECEIVE_READ))
            except WantReadError:
                break
            except ZeroReturnError:
                closed = True  # the peer's close_notify: deliver what came before it
                break
            except Error:
                failure = Failure()  # type: ignore[no-untyped-call]
                break
        if received and not self._aborted:
            ProtocolWrapper.dataReceived(self, b"".join(received))  # type: ignore[no-untyped-call]
        if closed:
            self._shutdownTLS()  # type: ignore[no-untyped-call]
            # None: the protocol's connectionLost gets the TCP transport's reason.
            self._tlsShutdownFinished(None)  # type: ignore[no-untyped-call]
        elif failure is not None:
            self._tlsShutdownFinished(failure)  # type: ignore[no-untyped-call]
        # The records read may call for an answer (handshake, key update).
        self._flushSendBIO()


class SubflowTLSFactory(TLSMemoryBIOFactory):
    """:class:`~twisted.protocols.tls.TLSMemoryBIOFactory` building :class:`SubflowTLSTransport`."""

    protocol = SubflowTLSTransport


@implementer(IStreamClientEndpoint)
class SubflowTLSEndpoint:
    """``wrapClientTLS`` with :class:`SubflowTLSFactory`: TLS over ``endpoint``."""

    def __init__(
        self, creator: IOpenSSLClientConnectionCreator, endpoint: IStreamClientEndpoint
    ) -> None:
        self._creator = creator
        self._endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        d: Deferred[Any] = self._endpoint.connect(
            SubflowTLSFactory(self._creator, True, protocolFactory)
        )
        return d.addCallback(lambda tls: tls.wrappedProtocol)


def server_tls_factory(
    creator: IOpenSSLServerConnectionCreator, wrapped: IProtocolFactory
) -> SubflowTLSFactory:
    """The listening side's TLS factory around the subflow factory ``wrapped``."""
    return SubflowTLSFactory(creator, False, wrapped)
