"""``stripe-test-consumer``: upload a payload to the test target and report timings.

Run it once directly and once through the SOCKS5 proxy with the same file to
compare the two paths. Results go to stdout as fixed ``key=value`` lines for
scripts; everything else (the generated file's path, errors) is logged to
stderr. The target's SHA-256 and byte count are checked against what was
sent, so a run that "succeeds" has also proved the proxy delivered the
payload intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IConsumer,
    IProducer,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from stripeproxy.harness import _cli
from stripeproxy.harness.socks5_client import SOCKS5ClientEndpoint, SOCKS5Error
from stripeproxy.net.endpoints import parse_host_port

if TYPE_CHECKING:
    from stripeproxy.harness.dashboard import ConsumerView, LiveDashboard

__all__ = [
    "DEFAULT_PAYLOAD_SIZE",
    "MIB",
    "ConsumerOptions",
    "ConsumerProgress",
    "UploadError",
    "UploadResult",
    "generate_payload",
    "main",
    "make_payload_file",
    "mode_line",
    "result_lines",
    "upload",
]

MIB: Final = 1024 * 1024
DEFAULT_PAYLOAD_SIZE: Final = 5 * MIB
CONNECT_TIMEOUT: Final = 30.0
# The overlay client answers a CONNECT only once the far side has reached
# the target (its --open-timeout is 30 s), so allow more than that.
SOCKS_HANDSHAKE_TIMEOUT: Final = 60.0

_log = Logger()

_WORDS: Final = (  # noqa: SIM905 - a word list reads best as text
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo "
    "lima mike november oscar papa quebec romeo sierra tango uniform "
    "victor whiskey xray yankee zulu stripe subflow chunk credit window "
    "frame stream session socket packet route proxy relay buffer latency "
    "jitter goodput backoff amber cobalt harbor meadow orchard pebble "
    "quartz river saffron timber velvet willow"
).split()


def generate_payload(path: str, size: int = DEFAULT_PAYLOAD_SIZE, seed: int = 0) -> None:
    """Write ``size`` bytes of numbered text lines to ``path``; same seed, same bytes.

    Text rather than random bytes so a corrupted or reordered transfer can
    be inspected by eye (the line numbers show where it went wrong);
    deterministic so runs on different machines can be compared.
    """
    rng = random.Random(seed)
    written = 0
    number = 0
    with open(path, "wb") as out:
        while written < size:
            batch = []
            for _ in range(1000):
                number += 1
                words = " ".join(rng.choices(_WORDS, k=rng.randint(6, 14)))
                batch.append(f"{number:07d} {words}\n")
            data = "".join(batch).encode("ascii")
            remaining = size - written
            if len(data) >= remaining:
                # Cut to size but keep a final newline, so the file stays lines.
                data = data[: remaining - 1] + b"\n"
            out.write(data)
            written += len(data)


def make_payload_file(
    size: int = DEFAULT_PAYLOAD_SIZE, seed: int = 0, directory: str | None = None
) -> str:
    """Generate a payload in a new temporary file (kept, for reuse with ``--file``)."""
    fd, path = tempfile.mkstemp(prefix="test-consumer-", suffix=".txt", dir=directory)
    os.close(fd)
    try:
        generate_payload(path, size, seed)
    except BaseException:
        os.unlink(path)
        raise
    return path


class UploadError(Exception):
    """The upload did not complete, or the target's account of it does not match."""


@dataclass(frozen=True)
class UploadResult:
    """What one upload measured, on both ends."""

    bytes_sent: int
    sha256: str
    """Hex SHA-256 of the bytes sent."""
    client_seconds: float
    """From starting the request (including connecting) to the full answer."""
    server_bytes: int
    server_time_ms: int
    """The target's first-body-byte to last-body-byte time."""
    server_sha256: str

    @property
    def client_time_ms(self) -> int:
        return round(self.client_seconds * 1000)

    @property
    def throughput_mibps(self) -> float:
        """Payload MiB per second of client time (connection setup included)."""
        if self.client_seconds <= 0:
            return float("inf")
        return self.bytes_sent / MIB / self.client_seconds


@dataclass
class ConsumerProgress:
    """Live state of one upload, for the ``--tui`` dashboard (and for tests).

    Times are the reactor's clock (``reactor.seconds()``). ``bytes_sent``
    counts body bytes handed to the connection, so it runs ahead of what
    the target has received by up to the socket buffers.
    """

    mode: str = "direct"
    """``direct`` or ``SOCKS host:port``, as in the ``mode:`` output line."""
    total_bytes: int = 0
    """Size of the payload being sent."""
    bytes_sent: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    result: UploadResult | None = None
    """The outcome, with the target's answer, once it has arrived."""
    error: str | None = None
    """Why the upload failed, if it did."""


@implementer(IConsumer)
class _CountingConsumer:
    """Passes body bytes on to the connection, counting and hashing them on the way."""

    def __init__(self, consumer: IConsumer, progress: ConsumerProgress, digest: Any) -> None:
        self._consumer = consumer
        self._progress = progress
        self._digest = digest

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        self._progress.bytes_sent += len(data)
        self._digest.update(data)
        self._consumer.write(data)


@implementer(IBodyProducer)
class _CountingBodyProducer:
    """A FileBodyProducer whose output updates :class:`ConsumerProgress` as it is written."""

    def __init__(self, inner: FileBodyProducer, progress: ConsumerProgress) -> None:
        self._inner = inner
        self._progress = progress
        self.digest = hashlib.sha256()
        self.length = inner.length

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        done: Deferred[None] = self._inner.startProducing(  # FileBodyProducer is untyped
            _CountingConsumer(consumer, self._progress, self.digest)
        )
        return done

    def pauseProducing(self) -> None:
        self._inner.pauseProducing()

    def resumeProducing(self) -> None:
        self._inner.resumeProducing()

    def stopProducing(self) -> None:
        self._inner.stopProducing()


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """Connects the Agent directly, or through the SOCKS5 proxy when one is given.

    Going through the proxy, the target's host is passed to it as written in
    the URL, so names are resolved by the proxy, as with
    ``curl --socks5-hostname``.
    """

    def __init__(self, reactor: Any, socks: tuple[str, int] | None) -> None:
        self._reactor = reactor
        self._socks = socks
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        if self._socks is None:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=CONNECT_TIMEOUT)
        else:
            proxy = HostnameEndpoint(
                self._reactor, self._socks[0], self._socks[1], timeout=CONNECT_TIMEOUT
            )
            endpoint = SOCKS5ClientEndpoint(
                proxy, host, uri.port, clock=self._reactor, timeout=SOCKS_HANDSHAKE_TIMEOUT
            )
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def mode_line(socks: tuple[str, int] | None) -> str:
    """The ``mode:`` output line."""
    return "mode: direct" if socks is None else f"mode: SOCKS {_format_address(*socks)}"


def result_lines(result: UploadResult) -> list[str]:
    """The result lines scripts grep for, after the ``mode:`` line."""
    return [
        f"client_time_ms={result.client_time_ms}",
        f"throughput_mibps={result.throughput_mibps:.2f}",
        f"server_bytes={result.server_bytes} server_time_ms={result.server_time_ms}",
    ]


def _was_cancelled(error: Exception) -> bool:
    reasons = getattr(error, "reasons", None)
    return isinstance(error, ResponseFailed | RequestTransmissionFailed) and any(
        reason.check(CancelledError) for reason in reasons or ()
    )


def _explain(error: Exception, target: str, socks: tuple[str, int] | None) -> str:
    """Turn what Agent and the endpoints raise into one sentence a user can act on."""
    if isinstance(error, UploadError):
        return str(error)
    if isinstance(error, SOCKS5Error):
        assert socks is not None
        return f"{error} (proxy {_format_address(*socks)})"
    if isinstance(error, ConnectError):
        if socks is not None:
            return f"cannot connect to the SOCKS5 proxy {_format_address(*socks)}: {error}"
        return f"cannot connect to the target {target}: {error}"
    # ResponseNeverReceived is a kind of ResponseFailed: test it first.
    for kind, what in (
        (ResponseNeverReceived, "the connection closed before the target answered"),
        (RequestTransmissionFailed, "sending the upload failed"),
        (ResponseFailed, "receiving the target's answer failed"),
    ):
        if isinstance(error, kind):
            reasons = "; ".join(reason.getErrorMessage() for reason in error.reasons)
            return f"{what}: {reasons}"
    return f"{type(error).__name__}: {error}"


_MAX_ANSWER: Final = 64 * 1024


class _AnswerReader(Protocol):
    """Collects the target's (small) answer body.

    Used instead of ``readBody``, which warns on every Agent response in
    current Twisted, and which would buffer an answer of any size.
    """

    def __init__(self, done: Deferred[bytes]) -> None:
        self._done = done
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > _MAX_ANSWER:
            if not self._done.called:
                self._done.errback(UploadError(f"the target's answer is over {_MAX_ANSWER} bytes"))
            # deliverBody connects this protocol to a producer of the response body
            # (IResponse.deliverBody says so), not to an ITransport as Protocol declares.
            cast(IPushProducer, self.transport).stopProducing()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)


def _read_answer(response: IResponse) -> Deferred[bytes]:
    done: Deferred[bytes] = Deferred()
    response.deliverBody(_AnswerReader(done))
    return done


def _excerpt(body: bytes) -> str:
    """The start of an answer body on one line, for error messages."""
    text = " ".join(body[:300].decode("utf-8", "replace").split())
    return repr(text[:200])


def _parse_answer(body: bytes) -> tuple[int, int, str]:
    """``(bytes, server_time_ms, sha256)`` from the target's JSON answer."""
    try:
        answer = json.loads(body)
        size, ms, digest = answer["bytes"], answer["server_time_ms"], answer["sha256"]
    except (ValueError, TypeError, KeyError):
        raise UploadError(
            f"the target's answer is not the expected JSON: {_excerpt(body)}"
        ) from None
    if not (isinstance(size, int) and isinstance(ms, int | float) and isinstance(digest, str)):
        raise UploadError(f"the target's answer has fields of the wrong type: {_excerpt(body)}")
    return size, round(ms), digest


async def _upload(
    reactor: Any,
    target_url: str,
    path: str,
    socks: tuple[str, int] | None,
    progress: ConsumerProgress,
) -> UploadResult:
    url = urlsplit(target_url)
    target = _format_address(url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    try:
        payload = open(path, "rb")  # noqa: SIM115 - closed below, after the request
    except OSError as e:
        raise UploadError(f"cannot read {path}: {e.strerror}") from None
    with payload:
        producer = _CountingBodyProducer(FileBodyProducer(payload), progress)
        agent = Agent.usingEndpointFactory(
            reactor,
            _EndpointFactory(reactor, socks),
            # One upload, one connection: nothing to keep alive afterwards.
            HTTPConnectionPool(reactor, persistent=False),
        )
        headers = Headers(
            {b"Content-Type": [b"text/plain"], b"User-Agent": [b"stripe-test-consumer"]}
        )
        progress.total_bytes = producer.length if isinstance(producer.length, int) else 0
        progress.bytes_sent = 0
        started = progress.started_at = reactor.seconds()
        try:
            response = await agent.request(b"POST", target_url.encode(), headers, producer)
            body = await _read_answer(response)
        except CancelledError:
            raise
        except Exception as e:
            if _was_cancelled(e):
                # Agent reports its own cancellation as a lost connection;
                # let upload()'s timeout see it for what it is.
                raise CancelledError() from e
            raise UploadError(_explain(e, target, socks)) from e
        finished = progress.finished_at = reactor.seconds()
    if not 200 <= response.code < 300:
        phrase = response.phrase.decode("latin-1")
        raise UploadError(f"the target answered HTTP {response.code} {phrase}: {_excerpt(body)}")
    server_bytes, server_ms, server_digest = _parse_answer(body)
    result = UploadResult(
        bytes_sent=progress.bytes_sent,
        sha256=producer.digest.hexdigest(),
        client_seconds=finished - started,
        server_bytes=server_bytes,
        server_time_ms=server_ms,
        server_sha256=server_digest,
    )
    if result.server_bytes != result.bytes_sent:
        raise UploadError(
            f"the target received {result.server_bytes} bytes, but {result.bytes_sent} were sent"
        )
    if result.server_sha256 != result.sha256:
        raise UploadError(
            f"the target's SHA-256 {result.server_sha256} differs from the payload's "
            f"{result.sha256}: the data was altered on the way"
        )
    progress.result = result
    return result


def upload(
    reactor: Any,
    target_url: str,
    path: str,
    *,
    socks: tuple[str, int] | None = None,
    progress: ConsumerProgress | None = None,
    timeout: float | None = None,
) -> Deferred[UploadResult]:
    """POST the file at ``path`` to ``target_url`` and check the target's answer.

    With ``socks=(host, port)`` the connection goes through that SOCKS5
    proxy. Fails with :class:`UploadError` whose message says what went
    wrong (target or proxy unreachable, SOCKS reply code, HTTP status,
    size or checksum mismatch, no answer within ``timeout`` seconds).
    ``progress``, if given, is updated as the upload proceeds.
    """
    if progress is None:
        progress = ConsumerProgress(mode=mode_line(socks).removeprefix("mode: "))
    tracked = progress

    def record_failure(failure: Failure) -> Failure:
        tracked.error = failure.getErrorMessage()
        return failure

    result = ensureDeferred(_upload(reactor, target_url, path, socks, tracked))
    if timeout is not None:

        def timed_out(value: object, seconds: float) -> object:
            if isinstance(value, Failure) and value.check(CancelledError):
                raise UploadError(f"the upload did not finish within {seconds:g} s")
            return value

        result.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
    result.addErrback(record_failure)
    return result


class ConsumerOptions(_cli.HarnessOptions):
    synopsis = (
        "Usage: stripe-test-consumer [--target URL] [--file PATH] "
        "[--use-socks [--socks HOST:PORT]] [--tui | --no-tui]"
    )
    longdesc = (
        "Upload a payload (a generated 5 MiB text file unless --file is given) "
        "to the stripeproxy test target, directly or through a SOCKS5 proxy, "
        "and print the client's and the server's timings."
    )
    optFlags = [["use-socks", None, "Go through the SOCKS5 proxy given by --socks."]]
    optParameters = [
        ["target", "t", "http://127.0.0.1:9000/upload", "URL to POST the payload to."],
        ["file", "f", None, "Payload file to send (default: generate a 5 MiB text file)."],
        ["socks", "s", "127.0.0.1:1080", "SOCKS5 proxy, host:port (with --use-socks)."],
        ["timeout", None, 300.0, "Seconds the whole upload may take.", float],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        url = urlsplit(self["target"])
        if url.scheme not in ("http", "https") or not url.hostname:
            raise usage.UsageError(f"--target must be an http:// or https:// URL: {url.geturl()}")
        try:
            url.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as e:
            raise usage.UsageError(f"--target: {e}") from None
        self["socks-address"] = None
        if self["use-socks"]:
            try:
                self["socks-address"] = parse_host_port(self["socks"])
            except ValueError as e:
                raise usage.UsageError(f"--socks: {e}") from None
        if self["timeout"] <= 0:
            raise usage.UsageError("--timeout must be positive")


def _emit(line: str) -> None:
    """Result lines go to stdout, unadorned, so scripts can grep them."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _consume(reactor: Any, options: ConsumerOptions, log: _cli.StderrLog) -> int:
    socks: tuple[str, int] | None = options["socks-address"]
    path = options["file"]
    if path is None:
        try:
            path = make_payload_file()
        except OSError as e:
            _log.error("cannot write the payload file: {error}", error=e)
            return _cli.EXIT_FAILURE
        _log.info("generated payload file: {path}", path=path)
    progress = ConsumerProgress(mode=mode_line(socks).removeprefix("mode: "))
    _emit(mode_line(socks))
    dashboard = _start_dashboard(reactor, options, progress, log) if options["tui"] else None
    try:
        result = await upload(
            reactor,
            options["target"],
            path,
            socks=socks,
            progress=progress,
            timeout=options["timeout"],
        )
    except UploadError as e:
        if dashboard is not None:
            dashboard.stop()
        _log.error("upload failed: {error}", error=e)
        return _cli.EXIT_FAILURE
    # The display must be gone before the result lines are written, so
    # that they are whole lines on stdout whatever terminal it was drawn on.
    if dashboard is not None:
        dashboard.stop()
    for line in result_lines(result):
        _emit(line)
    return _cli.EXIT_OK


def _start_dashboard(
    reactor: Any, options: ConsumerOptions, progress: ConsumerProgress, log: _cli.StderrLog
) -> LiveDashboard[ConsumerView]:
    """Start the live dashboard on ``progress`` and return it.

    Imported here so that plain runs do not load rich.
    """
    from stripeproxy.harness.dashboard import (
        ConsumerSampler,
        LiveDashboard,
        render_consumer,
        terminal_console,
    )

    dashboard = LiveDashboard(
        reactor,
        ConsumerSampler(progress, options["target"]),
        render_consumer,
        terminal_console(),
        log=log,
    )
    dashboard.start()
    # Ctrl+C stops the reactor: put the terminal back before it goes.
    reactor.addSystemEventTrigger("before", "shutdown", dashboard.stop)
    return dashboard


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stripe-test-consumer``; returns the exit status."""
    options = ConsumerOptions()
    code = _cli.parse_options(options, argv)
    if code is not None:
        return code
    log = _cli.begin_logging()
    return _cli.run(_consume, options, log)


if __name__ == "__main__":
    raise SystemExit(main())
