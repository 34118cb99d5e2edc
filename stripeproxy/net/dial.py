"""Dialling the server, one subflow slot at a time, with errors that explain themselves.

The client keeps K subflow *slots*; each is a ``ClientService`` that dials
again whenever its subflow fails or goes away.  This module sits between
that service and the endpoint:

* :class:`DialEndpoint` hands ``ClientService`` a connection only once the
  subflow has *joined* a session.  A refused connect, a failed TLS handshake,
  a REJECT and a handshake timeout all fail the same ``connect()`` Deferred,
  so every kind of failure counts as a failed attempt of that slot (a TCP
  connect used to reset the count, so a wrong fingerprint re-dialled four
  times a second for ever); a join resets it.  The delay itself comes from
  :class:`~stripeproxy.core.redial.RedialPolicy`, which also counts failed
  handshakes across slots and waits long after a bad-key REJECT.
* :func:`classify` turns the Failure of an attempt into a :class:`DialError`:
  a kind and a sentence an operator can act on.
* :class:`DialSlot` keeps each slot's state and logs its changes only (joined,
  failed for a new reason, connected again, lost), never each attempt; its
  :class:`DialStatus` feeds the dashboard and the metrics.
* :class:`DialService` is ``ClientService`` without its per-attempt log line.
"""

from __future__ import annotations

import errno
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.application.internet import ClientService
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from stripeproxy.core import wire
from stripeproxy.core.escape import printable
from stripeproxy.core.handshake import Rejected

if TYPE_CHECKING:
    from stripeproxy.net.client_subflow import ClientSubflow

__all__ = [
    "DialEndpoint",
    "DialError",
    "DialFailed",
    "DialKind",
    "DialOutcome",
    "DialService",
    "DialSlot",
    "DialStatus",
    "HandshakeFailed",
    "SlotWatcher",
    "classify",
    "describe_loss",
]


class DialKind(StrEnum):
    """Why an attempt failed, in words short enough for a metrics label."""

    REFUSED = "refused"
    TIMEOUT = "timeout"
    DNS = "dns"
    UNREACHABLE = "unreachable"
    TLS_CERTIFICATE = "tls-certificate"
    TLS_TO_PLAINTEXT = "tls-to-plaintext"
    TLS = "tls"
    NO_CHALLENGE = "no-challenge"
    CLOSED = "closed"
    BAD_KEY = "bad-key"
    REJECTED = "rejected"
    HANDSHAKE = "handshake"
    NO_SOURCE = "no-source"  # the path's source has no usable address (net/paths.py)
    OTHER = "other"


@dataclass(frozen=True)
class DialError:
    """One classified failure: ``message`` is safe to log (network text escaped)."""

    kind: DialKind
    message: str


class DialFailed(Exception):
    """The Failure a dial attempt ends with, so that ``ClientService`` counts it."""

    def __init__(self, error: DialError) -> None:
        super().__init__(error.message)
        self.error = error


class HandshakeFailed(Exception):
    """A subflow connected but never joined a session; what it saw on the way.

    ``reason`` is the ``connectionLost`` reason, ``failure`` why the subflow
    closed itself (``None`` if the peer or the TLS layer closed it),
    ``rejection`` the server's REJECT if one came, ``challenged`` whether the
    server's CHALLENGE arrived (in TLS mode: whether the TLS handshake got
    that far), ``timeout`` the handshake timeout in seconds.
    """

    def __init__(
        self,
        reason: Failure | None,
        failure: str | None,
        rejection: Rejected | None,
        challenged: bool,
        timeout: float,
    ) -> None:
        super().__init__(failure or (reason.getErrorMessage() if reason else "connection lost"))
        self.reason = reason
        self.failure = failure
        self.rejection = rejection
        self.challenged = challenged
        self.timeout = timeout


class DialOutcome:
    """What one dialled subflow tells its :class:`DialEndpoint`.

    :class:`~stripeproxy.net.client_subflow.ClientSubflow` owns one and fills
    it in: ``joined`` fires when the subflow joins a session, or fails with
    :class:`HandshakeFailed` if the connection ends first; ``closed`` fires
    once a joined subflow is gone, ``reason`` then says why (the
    ``connectionLost`` reason: a Deferred cannot carry a Failure as a result).
    ``watched`` is set by the endpoint: then the dialler reports handshake
    failures (once per kind), so the subflow does not log each one itself.
    """

    def __init__(self, handshake_timeout: float) -> None:
        self.joined: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.handshake_timeout = handshake_timeout
        self.watched = False
        self.aborted = False  # this client closed it (the session, or a retired slot)
        self.challenged = False
        self.rejection: Rejected | None = None
        self.failure: str | None = None

    def lost(self, reason: Failure | None) -> None:
        """The connection is gone: fail ``joined`` or fire ``closed``."""
        self.reason = reason
        if not self.joined.called:
            self.joined.errback(
                HandshakeFailed(
                    reason, self.failure, self.rejection, self.challenged, self.handshake_timeout
                )
            )
        elif not self.closed.called:
            self.closed.callback(None)


# --------------------------------------------------------------- classify

# OpenSSL's words for "the bytes that came back are not TLS": the server sent
# its plaintext CHALLENGE (or something else) in answer to our ClientHello.
_NOT_TLS = (
    "wrong version number",
    "packet length too long",
    "record layer failure",
    "unknown protocol",
    "http request",
)
# The server, or the network, ended the connection in the middle of the TLS handshake.
_TLS_CUT = ("unexpected eof", "eof while reading")
# Why a server closes a new connection without a word (SPEC.md section 2).
_SILENT_CLOSE = "a server also does this while its handshake pool is full (--max-handshakes)"
_CONNECT_ERRNOS = {
    errno.EHOSTUNREACH: "no route to the server's host",
    errno.ENETUNREACH: "the server's network is unreachable",
}


def _tls_reasons(value: BaseException) -> str:
    """OpenSSL's reason strings from an ``SSL.Error``, joined."""
    parts: list[str] = []
    for entry in value.args[0] if value.args and isinstance(value.args[0], list) else []:
        if isinstance(entry, tuple) and entry:
            parts.append(str(entry[-1]))
    return "; ".join(parts) or str(value)


def _classify_tls(value: BaseException) -> DialError:
    reasons = _tls_reasons(value)
    lowered = reasons.lower()
    if "certificate verify failed" in lowered:
        return DialError(
            DialKind.TLS_CERTIFICATE,
            "TLS: the server's certificate did not verify (wrong --server-fingerprint or --ca, "
            "or another server at that address)",
        )
    if any(words in lowered for words in _NOT_TLS):
        return DialError(
            DialKind.TLS_TO_PLAINTEXT,
            f"the server does not speak TLS here ({reasons}): is it running with --no-tls?",
        )
    if any(words in lowered for words in _TLS_CUT):
        return DialError(
            DialKind.CLOSED,
            f"the server closed the connection during the TLS handshake (it may be running "
            f"with --no-tls; {_SILENT_CLOSE})",
        )
    if "alert" in lowered:
        return DialError(
            DialKind.TLS,
            f"the server refused our TLS handshake ({reasons}): "
            "does it want a client certificate (--client-cert)?",
        )
    return DialError(DialKind.TLS, f"TLS handshake failed: {reasons}")


def _classify_handshake(failed: HandshakeFailed, tls: bool, key_id: str) -> DialError:
    rejection = failed.rejection
    if rejection is not None:
        if rejection.code == wire.REJECT_BAD_AUTH:
            which = f" (key id {printable(key_id)!r})" if key_id else ""
            return DialError(
                DialKind.BAD_KEY,
                f"the server refused our key{which}: check --psk-file / --key-id",
            )
        why = printable(rejection.reason) if rejection.reason else f"code {rejection.code}"
        return DialError(DialKind.REJECTED, f"the server rejected the subflow: {why}")
    reason = failed.reason
    if reason is not None and isinstance(reason.value, SSL.Error):
        return _classify_tls(reason.value)
    if failed.failure is not None:
        if failed.failure.startswith("handshake timed out") and not failed.challenged:
            if tls:
                return DialError(
                    DialKind.NO_CHALLENGE,
                    f"no CHALLENGE from the server within {failed.timeout:g} s "
                    "(the TLS handshake or the server is stuck)",
                )
            return DialError(
                DialKind.NO_CHALLENGE,
                f"no CHALLENGE from the server within {failed.timeout:g} s: "
                "does it use TLS? drop --no-tls",
            )
        return DialError(DialKind.HANDSHAKE, f"handshake failed: {printable(failed.failure)}")
    if not failed.challenged:
        hint = "it may be running with --no-tls" if tls else "if it uses TLS, drop --no-tls"
        return DialError(
            DialKind.CLOSED,
            f"the server closed the connection before its CHALLENGE ({hint}; {_SILENT_CLOSE})",
        )
    return DialError(
        DialKind.CLOSED,
        f"the server closed the connection during the handshake ({describe_loss(reason)})",
    )


def classify(failure: Failure, tls: bool, key_id: str = "") -> DialError:
    """Why one dial attempt failed, from its Failure (a connect error or
    :class:`HandshakeFailed`), in words an operator can act on."""
    value = failure.value
    if isinstance(value, DialFailed):
        return value.error
    if isinstance(value, HandshakeFailed):
        return _classify_handshake(value, tls, key_id)
    if isinstance(value, error.ConnectionRefusedError):
        return DialError(
            DialKind.REFUSED, "connection refused (is stripe-server running and listening there?)"
        )
    if isinstance(value, error.TimeoutError | error.TCPTimedOutError):
        return DialError(DialKind.TIMEOUT, "the connection timed out (--connect-timeout)")
    if isinstance(value, error.DNSLookupError):
        return DialError(DialKind.DNS, "DNS lookup failed: the server's name does not resolve")
    if isinstance(value, error.NoRouteError):
        return DialError(DialKind.UNREACHABLE, "no route to the server's host")
    if isinstance(value, error.ConnectError) and value.osError in _CONNECT_ERRNOS:
        return DialError(DialKind.UNREACHABLE, _CONNECT_ERRNOS[value.osError])
    if isinstance(value, SSL.Error):
        return _classify_tls(value)
    return DialError(DialKind.OTHER, printable(failure.getErrorMessage()))


def describe_loss(reason: Failure | None) -> str:
    """A few words for why an established connection ended."""
    if reason is None or isinstance(reason.value, error.ConnectionDone):
        return "closed by the server"
    if isinstance(reason.value, error.ConnectionAborted):
        return "closed by this client"
    if isinstance(reason.value, error.ConnectionLost):
        return "connection lost"
    if isinstance(reason.value, SSL.Error):
        return "TLS error: " + _tls_reasons(reason.value)
    return printable(reason.getErrorMessage())


# ------------------------------------------------------------------ state


@dataclass(frozen=True)
class DialStatus:
    """One slot as the dashboard and the metrics show it."""

    slot: int
    address: str
    state: str  # "connecting" (first or after a loss), "up" (joined), "down" (last attempt failed)
    error: DialError | None  # the last failure, kept after a recovery
    failures: int  # failed attempts in a row (0 once joined)
    failed_total: int  # failed attempts over the client's life
    since: float  # when the state last changed (the slot's clock)
    path: str = ""  # the --path it belongs to ("": no --path)
    session: str = ""  # while joined: the session's label and the subflow's id in it
    sid: int = 0


class SlotWatcher(typing.Protocol):
    """Who hears of a slot's changes besides the log: its path (net/paths.py)."""

    def slot_joined(self, slot: DialSlot) -> None: ...
    def slot_failed(self, slot: DialSlot, dial_error: DialError) -> None: ...
    def slot_lost(self, slot: DialSlot, why: str) -> None: ...


class DialSlot:
    """The state of one subflow slot, logged on change and shown on request.

    A slot logs one line when it first joins, when an attempt fails for a
    reason other than the one it last logged, when it connects again after
    failures, and when a joined subflow is lost; never once per attempt.  A
    bad-key REJECT is the exception: the subflow logs that once for every
    slot (SPEC.md section 2), so the slot only records it; so is a path
    without a usable source (its :class:`SlotWatcher` logs that once for the
    path).
    """

    log = Logger()

    def __init__(
        self,
        slot: int,
        address: str,
        tls: bool,
        retry_max: float,
        clock: IReactorTime,
        key_id: str = "",
        path: str = "",
    ) -> None:
        self.slot = slot
        self.path = path
        self.watcher: SlotWatcher | None = None
        self.address = address
        self.tls = tls
        self.retry_max = retry_max
        self.clock = clock
        self.key_id = key_id
        self.state = "connecting"
        self.error: DialError | None = None
        self.failures = 0
        self.failed_total = 0
        self.joins = 0
        self.since = clock.seconds()
        self.subflow: ClientSubflow | None = None  # while one is joined
        self._reported: DialError | None = None  # the failure last logged

    def status(self) -> DialStatus:
        subflow = self.subflow
        driver = subflow.driver if subflow is not None else None
        return DialStatus(
            self.slot,
            self.address,
            self.state,
            self.error,
            self.failures,
            self.failed_total,
            self.since,
            self.path,
            driver.label if driver is not None else "",
            subflow.sid if subflow is not None and driver is not None else 0,
        )

    def _enter(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.since = self.clock.seconds()

    def connecting(self) -> None:
        if self.state == "up":
            self._enter("connecting")

    def failed(self, dial_error: DialError) -> None:
        """An attempt failed: log it unless it is the failure last logged."""
        self.failures += 1
        self.failed_total += 1
        self.error = dial_error
        self._enter("down")
        if self.watcher is not None:
            self.watcher.slot_failed(self, dial_error)
        if dial_error == self._reported:
            return
        self._reported = dial_error
        if dial_error.kind in (DialKind.BAD_KEY, DialKind.NO_SOURCE):
            return  # logged once for all slots (ClientSubflow), or for the path
        self.log.warn(
            "subflow {slot} to {address}: {reason} — retrying with backoff, at most "
            "{retry_max:g} s apart",
            slot=self.slot,
            address=self.address,
            reason=dial_error.message,
            retry_max=self.retry_max,
            kind=str(dial_error.kind),
        )

    def joined(self) -> None:
        failures = self.failures
        self.joins += 1
        self.failures = 0
        self._reported = None
        self._enter("up")
        if self.watcher is not None:
            self.watcher.slot_joined(self)
        if failures:
            self.log.info(
                "subflow {slot} to {address}: connected again after {failures} failed attempt{s}",
                slot=self.slot,
                address=self.address,
                failures=failures,
                s="" if failures == 1 else "s",
            )
        elif self.joins == 1:
            self.log.info(
                "subflow {slot} joined the session at {address}",
                slot=self.slot,
                address=self.address,
            )
        else:
            self.log.info(
                "subflow {slot} to {address}: joined again", slot=self.slot, address=self.address
            )

    def lost(self, reason: Failure | None, aborted: bool = False) -> None:
        """A joined subflow is gone (``ClientService`` dials again); ``aborted``:
        this client closed it."""
        self._enter("connecting")
        ours = aborted or (reason is not None and isinstance(reason.value, error.ConnectionAborted))
        if self.watcher is not None:
            self.watcher.slot_lost(self, "closed by this client" if ours else describe_loss(reason))
        if ours:
            return  # the session (or whoever closed it) has logged why
        self.log.info(
            "subflow {slot} to {address}: lost ({why}); dialling again",
            slot=self.slot,
            address=self.address,
            why=describe_loss(reason),
        )


# --------------------------------------------------------------- endpoint


class JoinedSubflow(Protocol):
    """What ``ClientService`` holds for a slot: a subflow that joined a session.

    Its transport is the subflow's, so ``ClientService.stopService`` closes
    the subflow; :class:`DialEndpoint` calls ``connectionLost`` when the
    subflow is gone, which makes ``ClientService`` dial again.  (The subflow
    itself is the slot's ``subflow`` while it is joined.)
    """


@implementer(IStreamClientEndpoint)
class DialEndpoint:
    """An endpoint whose ``connect()`` fires when a subflow has joined a session.

    It dials ``endpoint`` with ``subflows`` (a factory of ClientSubflows)
    and waits for the subflow's :class:`DialOutcome`.  Only then does it build
    the caller's protocol (``ClientService``'s :class:`JoinedSubflow`) on the
    subflow's transport; any failure before that fails ``connect()`` with a
    classified :class:`DialFailed`, logged by the :class:`DialSlot`.

    Why not ``ClientService(prepareConnection=...)``, which exists for this:
    its state machine has no transition for a connection that is lost while
    it is being prepared, or after the preparation failed (``NoTransition``
    from inside ``connectionLost``, Twisted 26.10), and a subflow whose
    handshake failed is always closed.  Here ``ClientService`` never sees a
    connection that did not join.
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        subflows: IProtocolFactory,
        slot: DialSlot,
    ) -> None:
        self._endpoint = endpoint
        self._subflows = subflows
        self.slot = slot

    def __repr__(self) -> str:
        mode = "TLS" if self.slot.tls else "plaintext"
        return f"<DialEndpoint subflow {self.slot.slot} to {self.slot.address} ({mode})>"

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        slot = self.slot
        dialled: list[ClientSubflow] = []
        cancelled = False

        def cancel(result: Deferred[IProtocol]) -> None:
            nonlocal cancelled
            cancelled = True
            connecting.cancel()
            for subflow in dialled:
                subflow.abort()

        result: Deferred[IProtocol] = Deferred(cancel)

        def connected(subflow: ClientSubflow) -> None:
            dialled.append(subflow)
            outcome = subflow.dial
            outcome.watched = True
            outcome.joined.addCallbacks(lambda _: joined(subflow), failed)

        def joined(subflow: ClientSubflow) -> None:
            if cancelled:
                subflow.abort()
                return
            transport = subflow.transport
            assert transport is not None
            handle = protocolFactory.buildProtocol(transport.getPeer())
            if handle is None:
                subflow.abort()
                result.errback(DialFailed(DialError(DialKind.OTHER, "no protocol")))
                return
            handle.makeConnection(transport)

            def gone(_: None) -> None:
                reason = subflow.dial.reason
                slot.subflow = None
                slot.lost(reason, subflow.dial.aborted)
                # Failure() is untyped in Twisted.
                done = reason or Failure(error.ConnectionDone())  # type: ignore[no-untyped-call]
                handle.connectionLost(done)

            subflow.dial.closed.addCallback(gone)
            slot.subflow = subflow
            slot.joined()
            result.callback(handle)

        def failed(failure: Failure) -> None:
            if cancelled or isinstance(failure.value, CancelledError):
                if not result.called:
                    result.errback(failure)
                return
            dial_error = classify(failure, slot.tls, slot.key_id)
            slot.failed(dial_error)
            result.errback(DialFailed(dial_error))

        slot.connecting()
        connecting: Deferred[Any] = self._endpoint.connect(self._subflows)
        connecting.addCallbacks(connected, failed)
        return result


class _JoinedFactory(Factory):
    protocol = JoinedSubflow
    noisy = False


def _quiet_logger() -> Logger:
    """A logger that passes warnings and errors on and drops info and debug."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    return Logger(
        namespace="stripeproxy.net.dial.DialService",
        observer=FilteringLogObserver(globalLogPublisher, [predicate]),
    )


class DialService(ClientService):
    """``ClientService`` for one subflow slot, without its per-attempt log line.

    ``ClientService`` logs "Scheduling retry N to connect <endpoint> in D
    seconds" at info level through its class attribute ``_log`` on every
    failed attempt: no reason, and one line per attempt.  The slot logs
    state changes with their reason instead (:class:`DialSlot`), so this
    subclass gives ``ClientService`` a logger that drops info lines and
    passes warnings on.
    """

    _log = _quiet_logger()

    def __init__(
        self,
        endpoint: DialEndpoint,
        retry_policy: Callable[[int], float],
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__(endpoint, _JoinedFactory(), retryPolicy=retry_policy, clock=clock)
        self.slot = endpoint.slot
        self.retry_policy = retry_policy  # seconds before the next attempt, given the count
