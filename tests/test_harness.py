"""The test harness: stripe-test-target, stripe-test-consumer and its SOCKS5 client.

Uploads run on the real reactor over loopback sockets: directly, through a
minimal SOCKS5 relay defined here (which records what the consumer asked
for, and can refuse), and through the real stripeproxy pair. The
command-line entry points run as subprocesses, since ``react`` owns the
reactor of the process it runs in. The SOCKS5 client's handshake is also
driven byte by byte against an in-memory transport, where every failure
path can be provoked exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytest_twisted
from helpers import Cleanup, Keys, in_thread, start_pair, wait_for
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from stripeproxy.harness import consumer, target
from stripeproxy.harness.consumer import (
    MIB,
    ConsumerOptions,
    ConsumerProgress,
    UploadError,
    generate_payload,
    mode_line,
    result_lines,
    upload,
)
from stripeproxy.harness.socks5_client import SOCKS5ClientEndpoint, SOCKS5Error
from stripeproxy.harness.target import TargetOptions, TargetSite

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT = 20.0

# --------------------------------------------------------------- fixtures


async def start_test_target(cleanup: Cleanup) -> tuple[int, TargetSite]:
    port = await target.listen(reactor, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    cleanup.add(port.stopListening, "stop test target")
    site = port.factory  # type: ignore[attr-defined]
    assert isinstance(site, TargetSite)
    return port.getHost().port, site


async def listen_site(cleanup: Cleanup, site: Site) -> int:
    port: IListeningPort = reactor.listenTCP(0, site, interface="127.0.0.1")
    cleanup.add(port.stopListening, "stop site")
    return port.getHost().port


async def closed_port() -> int:
    """A loopback port nothing listens on (just freed; nothing else grabs it this fast)."""
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    number: int = port.getHost().port
    await port.stopListening()
    return number


def payload(tmp_path: Path, size: int = MIB, seed: int = 1) -> tuple[str, str]:
    """A generated payload file and its SHA-256."""
    path = str(tmp_path / f"payload-{size}-{seed}.txt")
    generate_payload(path, size, seed)
    return path, hashlib.sha256(Path(path).read_bytes()).hexdigest()


def http_get(url: str) -> tuple[int, bytes]:
    """Blocking GET with urllib (a client independent of the code under test)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Import this checkout; put generated payloads in the test's directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TMPDIR"] = str(tmp_path)
    return env


def run_consumer(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stripeproxy.harness.consumer", *args],
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )


# ------------------------------------------------- a minimal SOCKS5 relay


def _parse_connect(buffer: bytes) -> tuple[int, str, int, int] | None:
    """(ATYP, host, port, bytes used) of a complete CONNECT request, else None.

    Written independently of stripeproxy.core.address on purpose, so the
    consumer's encoding is checked against a second implementation.
    """
    if len(buffer) < 5:
        return None
    version, command, _, atyp = buffer[:4]
    assert (version, command) == (5, 1), buffer
    if atyp == 1:
        end = 8
        host = socket.inet_ntop(socket.AF_INET, buffer[4:end]) if len(buffer) >= end else ""
    elif atyp == 4:
        end = 20
        host = socket.inet_ntop(socket.AF_INET6, buffer[4:end]) if len(buffer) >= end else ""
    else:
        assert atyp == 3, buffer
        end = 5 + buffer[4]
        host = buffer[5:end].decode("ascii")
    if len(buffer) < end + 2:
        return None
    return atyp, host, int.from_bytes(buffer[end : end + 2], "big"), end + 2


class MiniSocks5(Factory):
    """Test-only SOCKS5 server: no authentication, CONNECT only, plain relaying.

    ``requests`` records (ATYP, host, port) of every CONNECT; ``refuse``
    set to a reply code answers every CONNECT with it; ``bound`` is the
    ATYP + address + port sent in success replies.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[int, str, int]] = []
        self.refuse: int | None = None
        self.bound = b"\x01\x7f\x00\x00\x01\x04\x38"
        self.live: set[_RelayIn] = set()

    def buildProtocol(self, addr: Any) -> _RelayIn:
        return _RelayIn(self)


class _RelayIn(Protocol):
    def __init__(self, server: MiniSocks5) -> None:
        self.server = server
        self.buffer = b""
        self.stage = "greeting"
        self.outbound: _RelayOut | None = None

    def connectionMade(self) -> None:
        self.server.live.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self.outbound is not None:
            self.outbound.transport.write(data)
            return
        self.buffer += data
        if self.stage == "greeting":
            if len(self.buffer) < 2 or len(self.buffer) < 2 + self.buffer[1]:
                return
            assert self.buffer[0] == 5
            self.buffer = self.buffer[2 + self.buffer[1] :]
            self.transport.write(b"\x05\x00")
            self.stage = "request"
        if self.stage == "request":
            parsed = _parse_connect(self.buffer)
            if parsed is None:
                return
            atyp, host, port, used = parsed
            self.buffer = self.buffer[used:]
            self.server.requests.append((atyp, host, port))
            self.stage = "connecting"
            if self.server.refuse is not None:
                self._reply(self.server.refuse)
                self.transport.loseConnection()
                return
            endpoint = HostnameEndpoint(reactor, host, port, timeout=5)
            endpoint.connect(Factory.forProtocol(lambda: _RelayOut(self))).addCallbacks(
                self._connected, self._failed
            )

    def _reply(self, code: int, bound: bytes = b"\x01\x00\x00\x00\x00\x00\x00") -> None:
        self.transport.write(bytes((5, code, 0)) + bound)

    def _connected(self, outbound: _RelayOut) -> None:
        self.outbound = outbound
        self._reply(0, self.server.bound)
        # Each side stops reading while the other cannot keep up.
        self.transport.registerProducer(outbound.transport, True)
        outbound.transport.registerProducer(self.transport, True)
        if self.buffer:
            outbound.transport.write(self.buffer)
            self.buffer = b""

    def _failed(self, _: Failure) -> None:
        self._reply(0x05)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.server.live.discard(self)
        if self.outbound is not None:
            self.outbound.transport.loseConnection()


class _RelayOut(Protocol):
    def __init__(self, inbound: _RelayIn) -> None:
        self.inbound = inbound

    def dataReceived(self, data: bytes) -> None:
        self.inbound.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.inbound.transport.loseConnection()


async def start_relay(cleanup: Cleanup) -> tuple[int, MiniSocks5]:
    relay = MiniSocks5()
    port = await listen_site(cleanup, relay)  # type: ignore[arg-type]

    def abort_leftovers() -> None:
        for protocol in list(relay.live):
            protocol.transport.abortConnection()

    cleanup.add(abort_leftovers, "abort relay connections")
    return port, relay


# ------------------------------------------------------------ the target


@pytest_twisted.ensureDeferred
async def test_health(cleanup: Cleanup) -> None:
    port, _ = await start_test_target(cleanup)
    assert await in_thread(http_get, f"http://127.0.0.1:{port}/health") == (200, b"ok")


@pytest_twisted.ensureDeferred
async def test_target_rejects_wrong_method_and_path(cleanup: Cleanup) -> None:
    port, site = await start_test_target(cleanup)
    status, _ = await in_thread(http_get, f"http://127.0.0.1:{port}/upload")
    assert status == 405
    status, _ = await in_thread(http_get, f"http://127.0.0.1:{port}/elsewhere")
    assert status == 404
    assert site.stats.requests == 2
    assert site.stats.uploads == 0


def test_target_options() -> None:
    options = TargetOptions()
    options.parseOptions([])
    assert (options["listen"], options["tui"]) == ("127.0.0.1:9000", False)
    options = TargetOptions()
    options.parseOptions(["--listen", "[::1]:9001", "--no-tui", "--tui"])
    assert (options["listen"], options["tui"]) == ("[::1]:9001", True)


def test_target_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert target.main(["--listen", "no-port"]) == 2
    assert "--listen: bad address" in capsys.readouterr().err


TARGET_ARGS = ("--listen", "tcp:0:interface=127.0.0.1", "--tui")


def test_target_main_serves_until_interrupted(tmp_path: Path) -> None:
    """The real entry point: listens, logs where, answers, exits 0 on SIGINT.

    Blocking and threadless on purpose: this test needs no reactor.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "stripeproxy.harness.target", *TARGET_ARGS],
        env=subprocess_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(SUBPROCESS_TIMEOUT, process.kill)
    watchdog.start()
    try:
        assert process.stderr is not None
        seen = []
        for line in process.stderr:
            seen.append(line)
            found = re.search(r"test-target listening on 127\.0\.0\.1:(\d+)", line)
            if found:
                break
        else:
            pytest.fail("the target never said where it listens:\n" + "".join(seen))
        assert http_get(f"http://127.0.0.1:{found.group(1)}/health") == (200, b"ok")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, "".join(seen) + err
    assert out == ""  # logs go to stderr


# ----------------------------------------------------- uploads, in-process


@pytest_twisted.ensureDeferred
async def test_direct_upload(cleanup: Cleanup, tmp_path: Path) -> None:
    port, site = await start_test_target(cleanup)
    path, digest = payload(tmp_path, 3 * MIB + 17)
    progress = ConsumerProgress()
    result = await upload(
        reactor, f"http://127.0.0.1:{port}/upload", path, progress=progress, timeout=20
    )
    size = os.path.getsize(path)
    assert result.server_bytes == result.bytes_sent == size
    assert result.server_sha256 == result.sha256 == digest
    assert result.client_seconds > 0
    assert result.server_time_ms <= result.client_time_ms

    assert progress.mode == "direct"
    assert progress.total_bytes == progress.bytes_sent == size
    assert progress.started_at is not None and progress.finished_at is not None
    assert progress.started_at <= progress.finished_at
    assert progress.result is result and progress.error is None

    stats = site.stats
    assert (stats.requests, stats.uploads) == (1, 1)
    assert stats.bytes_received == stats.last_upload_bytes == size
    assert stats.last_upload_sha256 == digest
    assert stats.last_upload_seconds is not None
    assert 0 <= stats.last_upload_seconds * 1000 <= result.server_time_ms + 1


@pytest_twisted.ensureDeferred
async def test_empty_upload(cleanup: Cleanup, tmp_path: Path) -> None:
    port, _ = await start_test_target(cleanup)
    path = tmp_path / "empty"
    path.write_bytes(b"")
    result = await upload(reactor, f"http://127.0.0.1:{port}/upload", str(path), timeout=20)
    assert (result.server_bytes, result.server_time_ms) == (0, 0)
    assert result.server_sha256 == hashlib.sha256(b"").hexdigest()


@pytest_twisted.ensureDeferred
async def test_http_error_is_reported(cleanup: Cleanup, tmp_path: Path) -> None:
    port, _ = await start_test_target(cleanup)
    path, _ = payload(tmp_path, 1000)
    progress = ConsumerProgress()
    with pytest.raises(UploadError, match=r"HTTP 404 Not Found"):
        await upload(reactor, f"http://127.0.0.1:{port}/nowhere", path, progress=progress)
    assert progress.error is not None and "404" in progress.error


class _LyingUpload(Resource):
    """Answers with the right size but a wrong checksum, as a corrupting path would."""

    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        size = len(request.content.read())
        return json.dumps({"bytes": size, "server_time_ms": 1, "sha256": "0" * 64}).encode()


@pytest_twisted.ensureDeferred
async def test_altered_payload_is_detected(cleanup: Cleanup, tmp_path: Path) -> None:
    port = await listen_site(cleanup, Site(_LyingUpload()))
    path, _ = payload(tmp_path, 5000)
    with pytest.raises(UploadError, match=r"altered"):
        await upload(reactor, f"http://127.0.0.1:{port}/upload", path)


class _Silent(Protocol):
    """Reads everything, answers nothing: a hung target."""

    connections: ClassVar[set[_Silent]] = set()

    def connectionMade(self) -> None:
        self.connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connections.discard(self)


@pytest_twisted.ensureDeferred
async def test_upload_times_out(cleanup: Cleanup, tmp_path: Path) -> None:
    port = await listen_site(cleanup, Factory.forProtocol(_Silent))  # type: ignore[arg-type]
    path, _ = payload(tmp_path, 1000)
    progress = ConsumerProgress()
    with pytest.raises(UploadError, match=r"did not finish within 0\.5 s"):
        await upload(
            reactor, f"http://127.0.0.1:{port}/upload", path, progress=progress, timeout=0.5
        )
    assert progress.error == "the upload did not finish within 0.5 s"
    # The client gave up by closing its connection.
    await wait_for(lambda: not _Silent.connections, "the client to hang up")


@pytest_twisted.ensureDeferred
async def test_target_down(tmp_path: Path) -> None:
    closed = await closed_port()
    path, _ = payload(tmp_path, 100)
    with pytest.raises(UploadError, match=rf"cannot connect to the target 127\.0\.0\.1:{closed}"):
        await upload(reactor, f"http://127.0.0.1:{closed}/upload", path)


# --------------------------------------------------- uploads through SOCKS5


@pytest.mark.parametrize(
    ("host", "atyp"),
    [("localhost", 3), ("127.0.0.1", 1)],
    ids=["domain", "ipv4"],
)
@pytest.mark.parametrize(
    "bound",
    [
        b"\x01\x7f\x00\x00\x01\x04\x38",
        b"\x04" + bytes(15) + b"\x01\x04\x38",
        b"\x03\x0dproxy.example\x04\x38",
    ],
    ids=["bound-ipv4", "bound-ipv6", "bound-domain"],
)
@pytest_twisted.ensureDeferred
async def test_upload_through_socks5_relay(
    cleanup: Cleanup, tmp_path: Path, host: str, atyp: int, bound: bytes
) -> None:
    port, site = await start_test_target(cleanup)
    socks_port, relay = await start_relay(cleanup)
    relay.bound = bound
    path, digest = payload(tmp_path, MIB)
    progress = ConsumerProgress(mode="SOCKS test")
    result = await upload(
        reactor,
        f"http://{host}:{port}/upload",
        path,
        socks=("127.0.0.1", socks_port),
        progress=progress,
        timeout=20,
    )
    # The name went to the proxy unresolved; an IP literal went as an IP.
    assert relay.requests == [(atyp, host, port)]
    assert result.server_bytes == MIB and result.server_sha256 == digest
    assert site.stats.last_upload_sha256 == digest
    assert progress.bytes_sent == MIB


@pytest_twisted.ensureDeferred
async def test_socks_refusal_names_the_reply_code(cleanup: Cleanup, tmp_path: Path) -> None:
    socks_port, relay = await start_relay(cleanup)
    relay.refuse = 0x05
    path, _ = payload(tmp_path, 100)
    with pytest.raises(UploadError) as caught:
        await upload(
            reactor, "http://target.invalid:80/upload", path, socks=("127.0.0.1", socks_port)
        )
    message = str(caught.value)
    assert "reply 0x05 (connection refused)" in message
    assert "target.invalid:80" in message
    assert f"proxy 127.0.0.1:{socks_port}" in message
    assert isinstance(caught.value.__cause__, SOCKS5Error)
    assert caught.value.__cause__.reply_code == 0x05


@pytest_twisted.ensureDeferred
async def test_socks_proxy_down(tmp_path: Path) -> None:
    closed = await closed_port()
    path, _ = payload(tmp_path, 100)
    with pytest.raises(
        UploadError, match=rf"cannot connect to the SOCKS5 proxy 127\.0\.0\.1:{closed}"
    ):
        await upload(reactor, "http://127.0.0.1:9/upload", path, socks=("127.0.0.1", closed))


@pytest_twisted.ensureDeferred
async def test_upload_through_stripeproxy(cleanup: Cleanup, keys: Keys, tmp_path: Path) -> None:
    """The harness's purpose: 5 MiB through the real overlay pair arrives intact."""
    port, site = await start_test_target(cleanup)
    pair = await start_pair(cleanup, keys, tls=False, k=3)
    path, digest = payload(tmp_path, 5 * MIB)
    result = await upload(
        reactor,
        f"http://localhost:{port}/upload",
        path,
        socks=("127.0.0.1", pair.socks_port),
        timeout=30,
    )
    assert result.server_bytes == 5 * MIB
    assert result.server_sha256 == result.sha256 == digest
    assert site.stats.uploads == 1


@pytest_twisted.ensureDeferred
async def test_stripeproxy_refusal_is_reported(
    cleanup: Cleanup, keys: Keys, tmp_path: Path
) -> None:
    closed = await closed_port()
    pair = await start_pair(cleanup, keys, tls=False, k=2)
    path, _ = payload(tmp_path, 100)
    with pytest.raises(UploadError, match=r"reply 0x05 \(connection refused\)"):
        await upload(
            reactor,
            f"http://127.0.0.1:{closed}/upload",
            path,
            socks=("127.0.0.1", pair.socks_port),
            timeout=30,
        )


# ------------------------------------------------ the consumer's command line

RESULT_LINES = re.compile(
    r"\Amode: (?P<mode>direct|SOCKS \S+)\n"
    r"client_time_ms=(?P<client_ms>\d+)\n"
    r"throughput_mibps=(?P<mibps>\d+\.\d{2})\n"
    r"server_bytes=(?P<bytes>\d+) server_time_ms=(?P<server_ms>\d+)\n\Z"
)


@pytest_twisted.ensureDeferred
async def test_consumer_main_direct(cleanup: Cleanup, tmp_path: Path) -> None:
    port, site = await start_test_target(cleanup)
    run = await in_thread(run_consumer, tmp_path, "--target", f"http://127.0.0.1:{port}/upload")
    assert run.returncode == 0, run.stderr
    lines = RESULT_LINES.match(run.stdout)
    assert lines, run.stdout
    assert lines["mode"] == "direct"
    assert int(lines["bytes"]) == 5 * MIB
    assert float(lines["mibps"]) > 0
    generated = re.search(r"generated payload file: (\S+)", run.stderr)
    assert generated, run.stderr
    path = Path(generated[1])
    assert path.parent == tmp_path and path.stat().st_size == 5 * MIB
    assert site.stats.last_upload_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest_twisted.ensureDeferred
async def test_consumer_main_socks_with_file(cleanup: Cleanup, tmp_path: Path) -> None:
    port, _ = await start_test_target(cleanup)
    socks_port, relay = await start_relay(cleanup)
    path, _ = payload(tmp_path, 12345)
    run = await in_thread(
        run_consumer,
        tmp_path,
        *("--target", f"http://localhost:{port}/upload", "--file", path),
        *("--use-socks", "--socks", f"127.0.0.1:{socks_port}", "--tui"),
    )
    assert run.returncode == 0, run.stderr
    lines = RESULT_LINES.match(run.stdout)
    assert lines, run.stdout
    assert lines["mode"] == f"SOCKS 127.0.0.1:{socks_port}"
    assert int(lines["bytes"]) == 12345
    assert "generated payload file" not in run.stderr
    assert relay.requests == [(3, "localhost", port)]


@pytest_twisted.ensureDeferred
async def test_consumer_main_socks_refused(cleanup: Cleanup, tmp_path: Path) -> None:
    socks_port, relay = await start_relay(cleanup)
    relay.refuse = 0x05
    path, _ = payload(tmp_path, 100)
    run = await in_thread(
        run_consumer,
        tmp_path,
        *("--target", "http://127.0.0.1:9/upload", "--file", path),
        *("--use-socks", "--socks", f"127.0.0.1:{socks_port}"),
    )
    assert run.returncode == 1
    assert run.stdout == f"mode: SOCKS 127.0.0.1:{socks_port}\n"
    assert "upload failed: " in run.stderr
    assert "reply 0x05 (connection refused)" in run.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--target", "ftp://example.com/upload"],
        ["--target", "http:///upload"],
        ["--use-socks", "--socks", "no-port"],
        ["--timeout", "0"],
        ["--bogus"],
    ],
)
def test_consumer_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert consumer.main(argv) == 2
    captured = capsys.readouterr()
    assert "error: " in captured.err and captured.out == ""


def test_consumer_options() -> None:
    options = ConsumerOptions()
    options.parseOptions([])
    assert options["target"] == "http://127.0.0.1:9000/upload"
    assert options["socks-address"] is None and options["tui"] is False
    options = ConsumerOptions()
    options.parseOptions(["--use-socks", "--socks", "[::1]:1081", "--tui"])
    assert options["socks-address"] == ("::1", 1081) and options["tui"] is True


def test_output_lines() -> None:
    assert mode_line(None) == "mode: direct"
    assert mode_line(("127.0.0.1", 1080)) == "mode: SOCKS 127.0.0.1:1080"
    assert mode_line(("::1", 1080)) == "mode: SOCKS [::1]:1080"
    result = consumer.UploadResult(
        bytes_sent=5 * MIB,
        sha256="x",
        client_seconds=0.5,
        server_bytes=5 * MIB,
        server_time_ms=410,
        server_sha256="x",
    )
    assert result_lines(result) == [
        "client_time_ms=500",
        "throughput_mibps=10.00",
        "server_bytes=5242880 server_time_ms=410",
    ]


def test_payload_is_deterministic_text(tmp_path: Path) -> None:
    first, second, other = (tmp_path / name for name in ("a", "b", "c"))
    generate_payload(str(first), 100_003, seed=7)
    generate_payload(str(second), 100_003, seed=7)
    generate_payload(str(other), 100_003, seed=8)
    data = first.read_bytes()
    assert len(data) == 100_003
    assert data == second.read_bytes() != other.read_bytes()
    assert data.endswith(b"\n") and data.isascii()
    lines = data.decode().splitlines()
    assert all(re.fullmatch(r"\d{7} [a-z ]+", line) for line in lines[:-1])
    assert [int(line[:7]) for line in lines[:-1]] == list(range(1, len(lines)))


def test_make_payload_file_default_size(tmp_path: Path) -> None:
    path = Path(consumer.make_payload_file(directory=str(tmp_path)))
    assert path.parent == tmp_path and path.name.startswith("test-consumer-")
    assert path.stat().st_size == consumer.DEFAULT_PAYLOAD_SIZE


# ------------------------------------- the SOCKS5 handshake, byte by byte


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


@implementer(IStreamClientEndpoint)
class _FakeProxy:
    """Stands for the TCP endpoint to the proxy: an in-memory transport, or a
    connection attempt that never completes (``hang``)."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.transport = StringTransport()
        self.protocol: Protocol | None = None
        self.cancelled = False

    def connect(self, factory: Any) -> Deferred[Protocol]:
        if self.hang:

            def cancel(d: Deferred[Protocol]) -> None:
                self.cancelled = True

            return Deferred(cancel)
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)

    def feed(self, data: bytes, one_byte_at_a_time: bool = True) -> None:
        assert self.protocol is not None
        chunks = [data[i : i + 1] for i in range(len(data))] if one_byte_at_a_time else [data]
        for chunk in chunks:
            self.protocol.dataReceived(chunk)

    def sent(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value


def _outcome(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


def _connect(
    proxy: _FakeProxy, host: str = "localhost", port: int = 8080, **kwargs: Any
) -> tuple[Deferred[Any], _Recorder]:
    inner = _Recorder()
    endpoint = SOCKS5ClientEndpoint(proxy, host, port, **kwargs)
    return endpoint.connect(Factory.forProtocol(lambda: inner)), inner


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("localhost", b"\x03\x09localhost"),
        ("10.1.2.3", b"\x01\x0a\x01\x02\x03"),
        ("::1", b"\x04" + bytes(15) + b"\x01"),
    ],
    ids=["domain", "ipv4", "ipv6"],
)
@pytest.mark.parametrize(
    "bound",
    [b"\x01\x00\x00\x00\x00", b"\x04" + bytes(16), b"\x03\x04host"],
    ids=["bound-ipv4", "bound-ipv6", "bound-domain"],
)
def test_handshake(host: str, address: bytes, bound: bytes) -> None:
    proxy = _FakeProxy()
    d, inner = _connect(proxy, host, 0x1F90)
    assert proxy.sent() == b"\x05\x01\x00"
    proxy.feed(b"\x05\x00")
    assert proxy.sent() == b"\x05\x01\x00" + address + b"\x1f\x90"
    reply = b"\x05\x00\x00" + bound + b"\x12\x34"
    proxy.feed(reply[:-1])
    assert not d.called
    # Whatever follows the reply in the same segment belongs to the inner protocol.
    proxy.feed(reply[-1:] + b"early", one_byte_at_a_time=False)
    assert _outcome(d) is inner
    assert inner.transport is proxy.transport
    assert inner.received == b"early"
    proxy.feed(b" and later")
    assert inner.received == b"early and later"
    inner.transport.write(b"request")
    assert proxy.sent() == b"request"
    assert proxy.protocol is not None
    proxy.protocol.connectionLost(Failure(ConnectionDone()))
    assert inner.lost is not None and inner.lost.check(ConnectionDone)


@pytest.mark.parametrize("code", [1, 2, 3, 4, 5, 6, 7, 8, 0x42])
def test_failure_reply(code: int) -> None:
    proxy = _FakeProxy()
    d, inner = _connect(proxy, "example.com", 80)
    proxy.feed(b"\x05\x00")
    proxy.feed(bytes((5, code)))  # decided without waiting for the bound address
    failure = _outcome(d)
    assert isinstance(failure, Failure) and failure.check(SOCKS5Error)
    assert failure.value.reply_code == code
    assert f"reply {code:#04x} (" in str(failure.value)
    assert "example.com:80" in str(failure.value)
    assert proxy.transport.disconnected
    assert proxy.protocol is not None
    proxy.protocol.connectionLost(Failure(ConnectionDone()))  # must not fire d again
    assert inner.lost is None


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"\x05\xff", "requires authentication"),
        (b"\x05\x02", "method 0x02"),
        (b"HTTP/1.1 400 Bad Request\r\n", "does not speak SOCKS5"),
        (b"\x05\x00\x04\x00", "does not speak SOCKS5"),
        (b"\x05\x00\x05\x00\x00\x07", "malformed SOCKS5 reply"),
    ],
    ids=["auth-required", "unoffered-method", "not-socks", "reply-version", "bad-atyp"],
)
def test_protocol_errors(answer: bytes, message: str) -> None:
    proxy = _FakeProxy()
    d, _ = _connect(proxy)
    proxy.feed(answer)
    failure = _outcome(d)
    assert isinstance(failure, Failure) and failure.check(SOCKS5Error)
    assert message in str(failure.value) and failure.value.reply_code is None
    assert proxy.transport.disconnected


def test_proxy_closes_during_handshake() -> None:
    proxy = _FakeProxy()
    d, _ = _connect(proxy)
    proxy.feed(b"\x05\x00\x05")
    assert proxy.protocol is not None
    proxy.protocol.connectionLost(Failure(ConnectionDone()))
    failure = _outcome(d)
    assert failure.check(SOCKS5Error)
    assert "closed the connection before answering" in str(failure.value)


def test_silent_proxy_times_out() -> None:
    clock = Clock()
    proxy = _FakeProxy()
    d, _ = _connect(proxy, clock=clock, timeout=5)
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.2)
    failure = _outcome(d)
    assert failure.check(SOCKS5Error) and "within 5 s" in str(failure.value)
    assert proxy.transport.disconnected
    assert clock.getDelayedCalls() == []


def test_unreachable_proxy_times_out() -> None:
    clock = Clock()
    proxy = _FakeProxy(hang=True)
    d, _ = _connect(proxy, clock=clock, timeout=5)
    clock.advance(5)
    failure = _outcome(d)
    assert failure.check(SOCKS5Error) and proxy.cancelled


def test_no_timeout_once_connected() -> None:
    clock = Clock()
    proxy = _FakeProxy()
    d, inner = _connect(proxy, clock=clock, timeout=5)
    proxy.feed(b"\x05\x00\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
    assert _outcome(d) is inner
    assert clock.getDelayedCalls() == []


def test_cancel_during_handshake() -> None:
    proxy = _FakeProxy()
    d, inner = _connect(proxy)
    proxy.feed(b"\x05\x00")
    d.cancel()
    assert _outcome(d).check(CancelledError)
    assert proxy.transport.disconnected
    assert proxy.protocol is not None
    proxy.protocol.connectionLost(Failure(ConnectionDone()))
    assert inner.lost is None


def test_cancel_while_connecting() -> None:
    proxy = _FakeProxy(hang=True)
    d, _ = _connect(proxy)
    d.cancel()
    assert _outcome(d).check(CancelledError) and proxy.cancelled


def test_endpoint_argument_checks() -> None:
    with pytest.raises(ValueError, match="cannot ask a SOCKS5 proxy"):
        SOCKS5ClientEndpoint(_FakeProxy(), "a" * 300, 80)
    with pytest.raises(ValueError, match="clock"):
        SOCKS5ClientEndpoint(_FakeProxy(), "localhost", 80, timeout=1)
