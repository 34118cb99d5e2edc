"""Dialling the target of a stream: resolve, check the policy, connect.

The server's ordinary TCP connection to the requested target is a
:class:`~stripeproxy.net.local.LocalStream` like the SOCKS side.
"""

from __future__ import annotations

import errno
import ipaddress
from typing import Any, cast

from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from stripeproxy.core import socks5
from stripeproxy.net.local import LocalStream


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects every address a name resolves to (Twisted's resolver API)."""

    def __init__(self) -> None:
        self.result: defer.Deferred[list[str]] = defer.Deferred()
        self.hosts: list[str] = []

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        """Nothing to do until addresses arrive."""

    def addressResolved(self, address: IAddress) -> None:
        self.hosts.append(address.host)  # type: ignore[attr-defined]

    def resolutionComplete(self) -> None:
        if not self.result.called:
            self.result.callback(self.hosts)


def resolve(reactor: Any, host: str, port: int) -> defer.Deferred[list[str]]:
    """Every address of ``host`` (an IP literal resolves to itself)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _resolvable(host):
            return defer.fail(error.DNSLookupError(f"{host}: not a host name"))
        receiver = _Addresses()
        reactor.nameResolver.resolveHostName(receiver, host, port)
        return receiver.result
    return defer.succeed([host])


def _resolvable(host: str) -> bool:
    """``getaddrinfo`` can be asked about ``host``.

    A NUL or a label the IDNA codec refuses (longer than 63 characters, or
    empty) makes it raise instead of failing the lookup; Twisted's resolver
    then never completes the resolution and logs an unhandled error, and the
    stream would wait for the client's open timeout.
    """
    if "\0" in host:
        return False
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


class TargetDenied(Exception):
    """The target policy forbids every address of the requested target."""


def reply_code_for(failure: Failure) -> int:
    """Map a failed target connection to the SOCKS5 reply the client will see."""
    exc = failure.value
    if isinstance(exc, TargetDenied):
        return socks5.REPLY_NOT_ALLOWED
    if isinstance(exc, error.ConnectionRefusedError):
        return socks5.REPLY_CONNECTION_REFUSED
    if isinstance(exc, error.DNSLookupError):
        return socks5.REPLY_HOST_UNREACHABLE
    if isinstance(exc, error.TimeoutError | defer.TimeoutError | defer.CancelledError):
        return socks5.REPLY_TTL_EXPIRED
    if isinstance(exc, error.NoRouteError):
        return socks5.REPLY_HOST_UNREACHABLE
    if isinstance(exc, error.ConnectError) and exc.osError is not None:
        if exc.osError == errno.ENETUNREACH:
            return socks5.REPLY_NETWORK_UNREACHABLE
        if exc.osError == errno.EHOSTUNREACH:
            return socks5.REPLY_HOST_UNREACHABLE
    return socks5.REPLY_GENERAL_FAILURE


class TargetProtocol(LocalStream):
    """The server's ordinary TCP connection to the requested target."""

    sent = 0  # bytes written to the target, for the access log
    received = 0  # bytes read from it

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.forward(data)

    def write_local(self, data: bytes) -> None:
        self.sent += len(data)
        super().write_local(data)


_TARGET_FACTORY = Factory.forProtocol(TargetProtocol)
_TARGET_FACTORY.noisy = False


def dial_literal(
    reactor: Any, address: str, port: int, timeout: float
) -> defer.Deferred[TargetProtocol]:
    """Connect to ``address``, an IP literal (v4 or v6) the policy has checked.

    Straight to ``reactor.connectTCP``, which takes IPv6 literals too
    (``TCP4ClientEndpoint`` is nothing more, whatever its name says).
    ``HostnameEndpoint`` would hand even a literal to the reactor's name
    resolver, and ``TCP6ClientEndpoint`` to ``getaddrinfo``, both in a
    thread: every CONNECT paid a thread hop, a GIL hand-over (up to the
    5 ms switch interval while the reactor is busy) and a wake-up of the
    event loop before its ``connect()`` even started.
    """
    endpoint = TCP4ClientEndpoint(reactor, address, port, timeout=timeout)
    return cast("defer.Deferred[TargetProtocol]", endpoint.connect(_TARGET_FACTORY))
