"""``stripe-test-target``: an HTTP service that receives uploads and says what arrived.

``POST /upload`` answers ``{"bytes": N, "server_time_ms": T, "sha256": "..."}``:
how many body bytes arrived, how long they took from the first to the last,
and their SHA-256, so the consumer can check that the proxy delivered the
payload complete and unaltered and compare the server's view of the transfer
time with its own. ``GET /health`` answers ``ok``.

The body is counted and hashed chunk by chunk as it arrives and then
dropped: twisted.web would otherwise spool every upload to a temporary file
first, which costs disk I/O that would show up in the measurements.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from stripeproxy.harness import _cli
from stripeproxy.net.endpoints import is_endpoint_string, parse_host_port, server_endpoint

__all__ = ["TargetOptions", "TargetSite", "TargetStats", "listen", "main"]

_log = Logger()


@dataclass
class TargetStats:
    """Live counters of the service, for the ``--tui`` dashboard (and for tests).

    All times are in the reactor's clock (``reactor.seconds()``), all sizes
    in bytes. Counters only grow, so a dashboard derives rates by sampling
    them; ``bytes_received`` moves while an upload is still arriving.
    """

    started_at: float
    """When the service started."""
    requests: int = 0
    """HTTP requests received (any method, any path)."""
    uploads: int = 0
    """Completed ``POST /upload`` requests."""
    bytes_received: int = 0
    """Request body bytes received so far, updated as each chunk arrives."""
    last_upload_bytes: int | None = None
    """Body size of the most recent completed upload."""
    last_upload_seconds: float | None = None
    """First body byte to last body byte of the most recent upload."""
    last_upload_sha256: str | None = None
    """Hex SHA-256 of the most recent upload's body."""
    last_upload_at: float | None = None
    """When the most recent upload completed."""


class _BodyDigest:
    """Stands in for ``Request.content``: counts and hashes the body instead of keeping it.

    twisted.web writes each body chunk to ``request.content``; the few other
    calls it makes on it (tell, seek, read, close) get harmless answers.
    """

    def __init__(self, clock: IReactorTime, stats: TargetStats) -> None:
        self._clock = clock
        self._stats = stats
        self._hash = hashlib.sha256()
        self.size = 0
        self.first_at: float | None = None
        self.last_at: float | None = None

    def write(self, data: bytes) -> None:
        now = self._clock.seconds()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.size += len(data)
        self._hash.update(data)
        self._stats.bytes_received += len(data)

    @property
    def seconds(self) -> float:
        """First byte to last byte; 0 for an empty or single-chunk body."""
        if self.first_at is None or self.last_at is None:
            return 0.0
        return self.last_at - self.first_at

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def tell(self) -> int:
        return self.size

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.size

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _TargetRequest(Request):
    """A request whose body goes into a :class:`_BodyDigest`."""

    channel: HTTPChannel

    def _target_site(self) -> TargetSite:
        # Site.buildProtocol sets ``channel.site``, which HTTPChannel does not declare
        # (and ``self.site`` is only set in ``process``, after ``gotLength``).
        site = getattr(self.channel, "site", None)
        assert isinstance(site, TargetSite)
        return site

    def gotLength(self, length: int | None) -> None:
        site = self._target_site()
        self.content = _BodyDigest(site.clock, site.stats)

    def process(self) -> None:
        self._target_site().stats.requests += 1
        super().process()


class _Root(Resource):
    """Holds ``/upload`` and ``/health``; anything else is a 404."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()


class _Endpoint(Resource):
    """A leaf answering only ``allowed`` methods, with a plain-text 405 for others.

    (twisted.web's own 405 page uses a deprecated, unescaped error page.)
    """

    isLeaf = True
    allowed: tuple[bytes, ...] = ()

    def render(self, request: Request) -> bytes:
        if request.method not in self.allowed:
            request.setResponseCode(405)
            request.setHeader(b"Allow", b", ".join(self.allowed))
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"method not allowed\n"
        result: bytes = super().render(request)
        return result


class _Upload(_Endpoint):
    """``/upload``: report what the body contained."""

    allowed = (b"POST",)

    def __init__(self, clock: IReactorTime, stats: TargetStats) -> None:
        super().__init__()
        self._clock = clock
        self._stats = stats

    def render_POST(self, request: Request) -> bytes:
        body = request.content
        assert isinstance(body, _BodyDigest)
        seconds = body.seconds
        digest = body.hexdigest()
        stats = self._stats
        stats.uploads += 1
        stats.last_upload_bytes = body.size
        stats.last_upload_seconds = seconds
        stats.last_upload_sha256 = digest
        stats.last_upload_at = self._clock.seconds()
        _log.info(
            "upload from {peer}: {size} bytes in {ms:.1f} ms, sha256 {digest}",
            peer=_describe_peer(request),
            size=body.size,
            ms=seconds * 1000,
            digest=digest,
        )
        answer = {"bytes": body.size, "server_time_ms": round(seconds * 1000), "sha256": digest}
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(answer).encode() + b"\n"


class _Health(_Endpoint):
    """``/health``: lets scripts wait until the target is up."""

    allowed = (b"GET", b"HEAD")

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"ok"


def _describe_peer(request: Request) -> str:
    return _describe_address(request.getClientAddress())


def _describe_address(address: object) -> str:
    """``host:port`` (``[v6]:port``) for IP addresses, whatever str() gives otherwise."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if not isinstance(host, str) or port is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TargetSite(Site):
    """The test-target web site: ``/upload`` and ``/health``, with its :class:`TargetStats`."""

    requestFactory = _TargetRequest

    def __init__(self, clock: IReactorTime, stats: TargetStats | None = None) -> None:
        self.clock = clock
        self.stats = stats if stats is not None else TargetStats(started_at=clock.seconds())
        root = _Root()
        root.putChild(b"upload", _Upload(clock, self.stats))
        root.putChild(b"health", _Health())
        # Form parsing would read the body back from request.content, which
        # keeps none of it.
        super().__init__(root, parsePOSTFormSubmission=False)
        self.displayTracebacks = False

    def log(self, request: http.Request) -> None:
        """No per-request access log: the upload log line says what matters."""


def listen(
    reactor: Any, endpoint: IStreamServerEndpoint, stats: TargetStats | None = None
) -> Deferred[IListeningPort]:
    """Start the service on ``endpoint``; the port's ``.factory`` is the :class:`TargetSite`.

    Tests and embedding programs use this rather than :func:`main`.
    """
    return endpoint.listen(TargetSite(reactor, stats))


class TargetOptions(_cli.HarnessOptions):
    synopsis = "Usage: stripe-test-target [--listen HOST:PORT] [--tui | --no-tui]"
    longdesc = (
        "HTTP upload sink for stripeproxy tests: POST /upload answers with the "
        "body's size, transfer time and SHA-256; GET /health answers ok."
    )
    optParameters = [
        [
            "listen",
            "l",
            "127.0.0.1:9000",
            "Where to listen: host:port, [v6addr]:port, or a Twisted endpoint string.",
        ],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if not is_endpoint_string(self["listen"]):
            try:
                parse_host_port(self["listen"])
            except ValueError as e:
                raise usage.UsageError(f"--listen: {e}") from None


async def _serve(reactor: Any, options: TargetOptions, log: _cli.StderrLog) -> int:
    try:
        endpoint = server_endpoint(reactor, options["listen"])
    except ValueError as e:
        _log.error("bad --listen {listen!r}: {error}", listen=options["listen"], error=e)
        return _cli.EXIT_FAILURE
    try:
        port = await listen(reactor, endpoint)
    except CannotListenError as e:
        _log.error("cannot listen on {listen}: {error}", listen=options["listen"], error=e)
        return _cli.EXIT_FAILURE
    where = _describe_address(port.getHost())
    _log.info("test-target listening on {where}", where=where)
    if options["tui"]:
        # Imported here so that plain runs do not load rich.
        from stripeproxy.harness.dashboard import (
            LiveDashboard,
            TargetSampler,
            render_target,
            terminal_console,
        )

        site = port.factory  # type: ignore[attr-defined]
        dashboard = LiveDashboard(
            reactor,
            TargetSampler(site.stats, where),
            render_target,
            terminal_console(),
            log=log,
        )
        dashboard.start()
        # Ctrl+C stops the reactor: put the terminal back before it goes.
        reactor.addSystemEventTrigger("before", "shutdown", dashboard.stop)
    await Deferred()  # serve until the reactor stops (SIGINT/SIGTERM)
    return _cli.EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stripe-test-target``; returns the exit status."""
    options = TargetOptions()
    code = _cli.parse_options(options, argv)
    if code is not None:
        return code
    log = _cli.begin_logging()
    return _cli.run(_serve, options, log)


if __name__ == "__main__":
    raise SystemExit(main())
