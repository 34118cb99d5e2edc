"""Listeners that end the process when they cannot listen, and who can reach them.

A proxy whose SOCKS port, subflow port or metrics port is taken must not keep
running as if it were healthy: the operator (or systemd's
``Restart=on-failure``) only learns of the problem from the exit status.
Twisted's ``StreamServerEndpointService`` logs the failure and carries on;
:class:`ListenService` ends the process instead, with one line naming the
address and the reason.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from stripeproxy.net.endpoints import is_endpoint_string, parse_host_port

_log = Logger()


class ListenFailed(SystemExit):
    """The process cannot do its job: it exits with status 1, without a traceback.

    A ``SystemExit``, so that twistd lets it through and Python prints no
    traceback; the message (``str(error)``) has been logged already.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 1


def listen_failure_reason(failure: Failure) -> str:
    """The operating system's words (``Address already in use``) when there are some."""
    error = failure.value
    if isinstance(error, CannotListenError) and isinstance(error.socketError, OSError):
        return error.socketError.strerror or str(error.socketError)
    return str(error) or type(error).__name__


def _exit_after_shutdown(reactor: Any) -> Callable[[str], None]:
    """Stop the reactor, then leave with status 1, as :class:`ListenFailed` does.

    Exceptions raised while the reactor runs are caught and logged by it, so
    the only way to an exit status is ``os._exit`` once shutdown has run.
    """

    def fatal(message: str) -> None:
        def leave() -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

        reactor.addSystemEventTrigger("after", "shutdown", leave)
        reactor.stop()

    return fatal


class ListenService(StreamServerEndpointService):
    """A listener named for people (``SOCKS listener on 127.0.0.1:1080``) that fails loudly.

    Endpoints that can fail at once (TCP, Unix, systemd, and the wrappers
    around them) fail inside ``privilegedStartService``: :class:`ListenFailed`
    is raised and twistd exits before the reactor runs.  A failure that comes
    later (an endpoint that listens asynchronously) is handed to ``fatal``,
    which by default stops the reactor and exits.  Either way the line goes
    to the log, and to ``tell`` too when given (the terminal when the log
    goes to a file, twistd's waiting parent process in daemon mode).
    """

    def __init__(
        self,
        what: str,
        address: str,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        reactor: Any,
        tell: Callable[[str], None] | None = None,
        fatal: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(endpoint, factory)  # type: ignore[no-untyped-call]
        self.what = what
        self.address = address
        self._tell = tell
        self._fatal = fatal if fatal is not None else _exit_after_shutdown(reactor)

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)  # type: ignore[no-untyped-call]
        synchronous = True
        failed: list[str] = []

        def failed_to_listen(failure: Failure) -> None:
            if failure.check(CancelledError):  # type: ignore[no-untyped-call]
                # stopService before the port was up: not a failure.
                return
            message = (
                f"cannot listen on {self.address} ({self.what}): {listen_failure_reason(failure)}"
            )
            _log.critical("{message}", message=message)
            if self._tell is not None:
                self._tell(message)
            if synchronous:
                failed.append(message)
            else:
                self._fatal(message)

        self._waitingForPort = self.endpoint.listen(self.factory)
        self._waitingForPort.addErrback(failed_to_listen)
        synchronous = False
        if failed:
            raise ListenFailed(failed[0])


def loopback_only(address: str) -> bool | None:
    """Whether only this host can reach a listener at ``address``.

    ``True`` for loopback addresses, ``localhost`` and Unix sockets; ``False``
    for every interface (``:1080``, ``tcp:1080``) or any other address;
    ``None`` when the address alone does not say (a systemd socket, an
    endpoint type we do not know).
    """
    if not is_endpoint_string(address):
        host, _port = parse_host_port(address, allow_zero=True)
        return _is_loopback_host(host)
    kind, _, rest = address.partition(":")
    if kind == "unix":
        return True
    if kind == "haproxy":
        return loopback_only(rest)
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    interface = ""
    for part in re.split(r"(?<!\\):", rest):
        name, eq, value = part.partition("=")
        if eq and name == "interface":
            interface = value.replace("\\:", ":")
    return _is_loopback_host(interface)


def _is_loopback_host(host: str) -> bool:
    if not host:
        return False  # every interface
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # another name: it may resolve anywhere
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
