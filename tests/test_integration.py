"""End-to-end tests: a real stripe-client and stripe-server on loopback sockets.

The pair runs in this process (services from the taps' ``makeService``,
fed real argv lists), except in the smoke test at the end, which runs both
under ``twistd`` as child processes.  Blocking test clients run in threads.
Nothing here asserts a wall time; 64 MiB transfers print their throughput
(see it with ``-s``) for information only.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import pytest_twisted
from helpers import (
    SOCKET_TIMEOUT,
    CountingFactory,
    DigestSink,
    DownloadFactory,
    EchoFactory,
    KiB,
    MiB,
    echo_roundtrip,
    free_port,
    in_thread,
    random_file,
    raw_exchange,
    read_all,
    socks_connect,
    socks_echo,
    socks_handshake_reply,
    start_client,
    start_pair,
    start_server,
    start_target,
    throughput,
    tx_shares,
    wait_for,
)
from python_socks import ProxyError
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.server import Site
from twisted.web.static import File

from stripeproxy.core import socks5, wire

MODES = [pytest.param(True, id="tls"), pytest.param(False, id="plain")]
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def mode(tls: bool) -> str:
    return "tls" if tls else "plain"


def check_echo(result, size: int) -> None:
    assert result.errors == []
    assert result.sent == size
    assert result.received == size
    assert result.received_sha == result.sent_sha


# ------------------------------------------------------------------ 1. echo


@pytest.mark.parametrize("tls", MODES)
@pytest.mark.parametrize("size", [5 * MiB, 64 * MiB], ids=["5MiB", "64MiB"])
@pytest_twisted.ensureDeferred
async def test_echo_with_half_close(cleanup, keys, tls, size):
    """Random bytes up, half-close, the echo comes back whole, then EOF."""
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(cleanup, keys, tls)
    result = await in_thread(socks_echo, pair.socks_port, target.port, size)
    print(f"\necho {mode(tls)} K={pair.k}: {throughput(size, result.seconds)} each way")
    check_echo(result, size)
    assert target.factory.connections == 1
    pair.assert_fault_free()


# -------------------------------------------------------------- 2. download


def download(socks_port: int, target_port: int) -> bytes:
    return read_all(socks_connect(socks_port, "127.0.0.1", target_port))


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_download(cleanup, keys, tls):
    """The target talks first and only: N random bytes, their SHA-256, close."""
    size = 16 * MiB + 12345
    target = await start_target(cleanup, DownloadFactory(size))
    pair = await start_pair(cleanup, keys, tls)
    data = await in_thread(download, pair.socks_port, target.port)
    assert len(data) == size + 32
    body, digest = data[:-32], data[-32:]
    assert digest == target.factory.digest
    assert hashlib.sha256(body).digest() == digest
    pair.assert_fault_free()


# ------------------------------------------------------ slow local readers


class HeldSink(DigestSink):
    """A digest sink that does not read until released."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.pauseProducing()

    def release(self) -> None:
        self.transport.resumeProducing()


class HeldSinkFactory(CountingFactory):
    protocol = HeldSink


def write_backlog(stream) -> int:
    transport = stream.transport
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def upload_then_wait(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    return read_all(sock)


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_fin_reaches_a_target_that_reads_late(cleanup, keys, tls):
    """The server half-closes towards a target whose write buffer is full.

    Regression: the target's transport had the stream's sink producer
    registered and paused, and Twisted then never carried out the
    half-close, so the target never saw EOF.
    """
    size = 3 * MiB
    target = await start_target(cleanup, HeldSinkFactory())
    pair = await start_pair(cleanup, keys, tls)
    sock = await in_thread(socks_connect, pair.socks_port, "127.0.0.1", target.port)
    data = random.Random(3).randbytes(size)
    reply = in_thread(upload_then_wait, sock, data)
    server = pair.server_driver()
    await wait_for(
        lambda: 1 in server.streams and server.streams[1]._write_closed,
        "the server to deliver the FIN to the target",
    )
    print(f"\ntarget write backlog at FIN: {write_backlog(server.streams[1])} bytes")
    (sink,) = target.factory.live
    sink.release()
    assert await reply == f"{size} {hashlib.sha256(data).hexdigest()}".encode()


def small_window_socks_connect(socks_port: int, port: int) -> socket.socket:
    """A by-hand SOCKS5 CONNECT on a socket with a tiny receive buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(SOCKET_TIMEOUT)
    sock.connect(("127.0.0.1", socks_port))
    sock.sendall(b"\x05\x01\x00")
    assert sock.recv(2) == b"\x05\x00"
    sock.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
    reply = b""
    while len(reply) < 10:
        reply += sock.recv(10 - len(reply))
    assert reply[1] == socks5.REPLY_SUCCEEDED
    return sock


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_eof_reaches_a_socks_client_that_reads_late(cleanup, keys, tls):
    """The client half-closes towards a SOCKS client whose write buffer is full."""
    size = 3 * MiB
    target = await start_target(cleanup, DownloadFactory(size))
    pair = await start_pair(cleanup, keys, tls)
    sock = await in_thread(small_window_socks_connect, pair.socks_port, target.port)
    client = pair.client_driver()
    await wait_for(
        lambda: 1 in client.streams and client.streams[1]._write_closed,
        "the client to deliver the EOF to the SOCKS client",
    )
    print(f"\nSOCKS client write backlog at EOF: {write_backlog(client.streams[1])} bytes")
    data = await in_thread(read_all, sock)
    assert len(data) == size + 32
    assert hashlib.sha256(data[:-32]).digest() == data[-32:] == target.factory.digest


# ------------------------------------------------------------ 3. concurrency


def concurrent_echoes(socks_port: int, target_port: int, sizes: list[int]):
    """Open every stream first (a barrier), then run all the echoes at once."""
    barrier = threading.Barrier(len(sizes), timeout=SOCKET_TIMEOUT)

    def one(i: int):
        sock = socks_connect(socks_port, "127.0.0.1", target_port)
        barrier.wait()
        return echo_roundtrip(sock, sizes[i], seed=i, block=64 * KiB)

    with ThreadPoolExecutor(max_workers=len(sizes)) as pool:
        return list(pool.map(one, range(len(sizes))))


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_fifty_concurrent_streams(cleanup, keys, tls):
    rng = random.Random(50)
    sizes = [rng.randrange(256 * KiB, MiB + 1) for _ in range(50)]
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(cleanup, keys, tls)
    results = await in_thread(concurrent_echoes, pair.socks_port, target.port, sizes)
    for size, result in zip(sizes, results, strict=True):
        check_echo(result, size)
    assert target.factory.connections == 50
    peak = target.factory.peak
    print(f"\n50 streams, {sum(sizes) / MiB:.1f} MiB; peak concurrent targets {peak}")
    # Every stream finished cleanly on both sides.
    await wait_for(
        lambda: not pair.client_driver().stream_count and not pair.server_driver().stream_count,
        "both sessions to forget the finished streams",
    )
    pair.assert_fault_free(busy=True)


# -------------------------------------------------------------- 4. striping


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_striping_uses_every_subflow(cleanup, keys, tls):
    size = 64 * MiB
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(cleanup, keys, tls, k=6)
    result = await in_thread(socks_echo, pair.socks_port, target.port, size, 4)
    check_echo(result, size)
    print(f"\nstriping {mode(tls)} K=6: {throughput(size, result.seconds)} each way")
    for side, driver in (("client", pair.client_driver()), ("server", pair.server_driver())):
        shares = tx_shares(driver)
        total = sum(shares.values())
        percent = {sid: round(100 * n / total, 1) for sid, n in shares.items()}
        print(f"{side} tx_real by subflow (%): {percent}")
        assert len(shares) == 6
        assert total >= size  # payload, plus the control stream's messages
        for sid, n in shares.items():
            assert n >= 0.03 * total, f"{side} subflow {sid} carried {percent[sid]}%"
    pair.assert_fault_free()


# ------------------------------------------------------------------ 5. curl


async def curl(*args: str) -> bytes:
    out, err, code = await getProcessOutputAndValue(
        "curl", ["-sS", "--fail", "--max-time", "60", *args], env=dict(os.environ)
    )
    assert code == 0, f"curl {args} exited {code}: {err.decode(errors='replace')}"
    return out


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_curl_through_the_proxy(cleanup, keys, tls, tmp_path):
    digest = random_file(tmp_path / "file", 3 * MiB + 7)
    web = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Site(File(str(tmp_path)))
    )
    cleanup.add(web.stopListening, "stop web server")
    http_port = web.getHost().port
    pair = await start_pair(cleanup, keys, tls)
    proxy = f"127.0.0.1:{pair.socks_port}"
    body = await curl("--socks5", proxy, f"http://127.0.0.1:{http_port}/file")
    assert hashlib.sha256(body).hexdigest() == digest
    # The name is resolved by the server ("localhost" may give ::1 first).
    body = await curl("--socks5-hostname", proxy, f"http://localhost:{http_port}/file")
    assert hashlib.sha256(body).hexdigest() == digest


# ---------------------------------------------------------- 6. python-socks


def short_echo(socks_port: int, target_port: int, timeout: float = SOCKET_TIMEOUT, **auth) -> bytes:
    sock = socks_connect(socks_port, "127.0.0.1", target_port, timeout=timeout, **auth)
    sock.sendall(b"hello, striped world")
    sock.shutdown(socket.SHUT_WR)
    return read_all(sock)


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_python_socks_without_auth(cleanup, keys, tls):
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(cleanup, keys, tls)
    assert await in_thread(short_echo, pair.socks_port, target.port) == b"hello, striped world"


@pytest_twisted.ensureDeferred
async def test_socks_username_password(cleanup, keys):
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(
        cleanup, keys, True, client_extra=["--socks-user", "alice", "--socks-password", "s3cret"]
    )
    reply = await in_thread(
        short_echo, pair.socks_port, target.port, user="alice", password="s3cret"
    )
    assert reply == b"hello, striped world"
    with pytest.raises(ProxyError):
        await in_thread(short_echo, pair.socks_port, target.port, user="alice", password="nope")
    with pytest.raises(ProxyError):
        await in_thread(short_echo, pair.socks_port, target.port, user="mallory", password="s3cret")
    with pytest.raises(ProxyError):
        await in_thread(short_echo, pair.socks_port, target.port)
    assert target.factory.connections == 1  # only the authenticated client got through


def early_data_exchange(socks_port: int, address: bytes, port: int, payload: bytes) -> bytes:
    """Greeting, CONNECT, payload and FIN in one go, before any reply is read."""
    sock = socket.create_connection(("127.0.0.1", socks_port), timeout=SOCKET_TIMEOUT)
    sock.sendall(b"\x05\x01\x00" + b"\x05\x01\x00" + address + port.to_bytes(2, "big") + payload)
    sock.shutdown(socket.SHUT_WR)
    return read_all(sock)


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_data_sent_before_the_socks_reply_is_kept(cleanup, keys, tls):
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(cleanup, keys, tls)
    payload = random.Random(5).randbytes(20000)
    ipv4 = b"\x01" + socket.inet_aton("127.0.0.1")
    reply = await in_thread(early_data_exchange, pair.socks_port, ipv4, target.port, payload)
    assert reply[:3] == b"\x05\x00\x05"  # method chosen, then CONNECT succeeded
    assert reply[3] == socks5.REPLY_SUCCEEDED
    assert reply[12:] == payload  # after the method choice and the 10-byte reply


@pytest_twisted.ensureDeferred
async def test_ipv6_literal_target(cleanup, keys):
    factory = EchoFactory()
    listening = await TCP6ServerEndpoint(reactor, 0, interface="::1").listen(factory)
    cleanup.add(listening.stopListening, "stop IPv6 target")
    pair = await start_pair(cleanup, keys, True)
    ipv6 = b"\x04" + socket.inet_pton(socket.AF_INET6, "::1")
    port = listening.getHost().port
    reply = await in_thread(early_data_exchange, pair.socks_port, ipv6, port, b"over six")
    assert reply[3] == socks5.REPLY_SUCCEEDED
    assert reply[2 + 22 :] == b"over six"  # after the method choice and the IPv6 reply
    assert factory.connections == 1


# -------------------------------------------------------------- 7. wrong PSK


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_wrong_psk_dials_nothing(cleanup, keys, tls, log_messages):
    target = await start_target(cleanup, EchoFactory())
    server = await start_server(cleanup, keys, tls)
    client = await start_client(
        cleanup,
        keys,
        server.port,
        tls,
        k=3,
        extra=["--open-timeout", "1"],
        psk=keys.wrong_psk,
    )
    # The answer must come from --open-timeout (1 s), not from the end of the
    # session's grace period (30 s) nor from the client giving up (python-socks
    # raises ProxyTimeoutError, not ProxyError, after 20 s).
    with pytest.raises(ProxyError) as failure:
        await in_thread(short_echo, client.socks_port, target.port, timeout=20)
    assert failure.value.error_code == socks5.REPLY_GENERAL_FAILURE
    assert any("authentication failed" in m for m in log_messages)
    assert server.sessions == []
    assert target.factory.connections == 0
    driver = client.driver
    assert driver is None or (not driver.established and not driver.subflows)


# ------------------------------------------------------- 8. target failures


def socks_error_code(socks_port: int, host: str, port: int) -> int | None:
    try:
        socks_connect(socks_port, host, port).close()
    except ProxyError as e:
        return e.error_code
    return socks5.REPLY_SUCCEEDED


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_target_failures_map_to_socks_replies(cleanup, keys, tls):
    pair = await start_pair(cleanup, keys, tls)
    closed_port = await free_port()
    code = await in_thread(socks_error_code, pair.socks_port, "127.0.0.1", closed_port)
    assert code == socks5.REPLY_CONNECTION_REFUSED
    code = await in_thread(socks_error_code, pair.socks_port, "nonexistent.invalid", 80)
    assert code == socks5.REPLY_HOST_UNREACHABLE
    # The same, with the handshake done by hand (domain-name address form).
    reply = await in_thread(socks_handshake_reply, pair.socks_port, "nonexistent.invalid", 80)
    assert reply == socks5.REPLY_HOST_UNREACHABLE
    # The session is unharmed.
    assert pair.established()
    assert pair.client_driver().session.stream_ids == []
    assert pair.server_driver().session.stream_ids == []


# --------------------------------------------------------- server restart


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_client_recovers_from_a_server_restart(cleanup, keys, tls, log_messages):
    """The restarted server rejects the old session; the client starts a new one."""
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(cleanup, keys, tls, k=3)
    check_echo(await in_thread(socks_echo, pair.socks_port, target.port, MiB), MiB)
    old_session = pair.client_driver()

    await pair.server.stop()
    await wait_for(lambda: not old_session.subflows, "the client to lose every subflow")
    listen = f"tcp:{pair.server.port}:interface=127.0.0.1"
    pair.server = await start_server(cleanup, keys, tls, listen=listen)
    await pair.wait_established()

    assert pair.client_driver() is not old_session
    assert old_session.closed
    assert any("unknown session" in m for m in log_messages)
    check_echo(await in_thread(socks_echo, pair.socks_port, target.port, MiB, 1), MiB)


# ------------------------------------------------------------ 9. bad input


def socks_garbage() -> list[tuple[bytes, bytes]]:
    """Bad SOCKS input and the only reply each may get before the close."""
    junk = bytearray(random.Random(9).randbytes(64 * KiB))
    junk[0] = 0x47  # not SOCKS version 5, so it is refused at once
    refused_atyp = b"\x05\x08\x00\x01" + bytes(6)
    return [
        (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", b""),
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00", b""),  # SOCKS4
        (b"\x05\x01\x00\x05\x01\x00\x09\x00\x00", b"\x05\x00" + refused_atyp),
        (bytes(junk), b""),
    ]


def subflow_garbage(crc: bool) -> list[bytes]:
    auth = wire.Auth(
        wire.PROTOCOL_VERSION, secrets.token_bytes(32), secrets.token_bytes(16), 0, "", bytes(32)
    )
    return [
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        random.Random(10).randbytes(64 * KiB),
        b"\x11\x00\xff\xff\xff\xff" + bytes(1000),  # AUTH with a 4 GiB body
        wire.encode_ping(1, crc),  # a frame not allowed before the handshake
        wire.encode_auth(auth, crc),  # well-formed, wrong MAC
    ]


def tls_exchange(port: int, cafile: str, payload: bytes) -> bytes:
    """Garbage inside a TLS connection that verified the server."""
    context = ssl.create_default_context(cafile=cafile)
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock = context.wrap_socket(raw, server_hostname="localhost")
    pieces = []
    try:
        sock.sendall(payload)
        while data := sock.recv(65536):
            pieces.append(data)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        pass
    finally:
        sock.close()
    return b"".join(pieces)


def echo_part(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` on an open echo stream and read the same amount back."""
    sender = threading.Thread(target=sock.sendall, args=(data,))
    sender.start()
    received = bytearray()
    while len(received) < len(data):
        piece = sock.recv(256 * KiB)
        assert piece, "EOF in the middle of the echo"
        received += piece
    sender.join()
    return bytes(received)


@pytest.mark.parametrize("tls", MODES)
@pytest_twisted.ensureDeferred
async def test_garbage_is_refused_while_a_transfer_goes_on(cleanup, keys, tls, log_messages):
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(cleanup, keys, tls)
    sock = await in_thread(socks_connect, pair.socks_port, "127.0.0.1", target.port)
    first = random.Random(1).randbytes(2 * MiB)
    assert await in_thread(echo_part, sock, first) == first

    # SOCKS port: each connection gets at most an error reply, then is closed
    # (raw_exchange times out if the proxy kept it open).
    for payload, expected in socks_garbage():
        assert await in_thread(raw_exchange, pair.socks_port, payload) == expected
    # Subflow port: the server's CHALLENGE (plaintext) or a TLS alert, then a close.
    for payload in subflow_garbage(crc=not tls):
        await in_thread(raw_exchange, pair.server.port, payload)
    if tls:
        for payload in subflow_garbage(crc=False):
            await in_thread(tls_exchange, pair.server.port, keys.cert, payload)
    assert any("authentication failed" in m for m in log_messages)

    # Nothing else was disturbed: same session, all subflows, the stream goes on.
    assert pair.established()
    assert target.factory.connections == 1
    result = await in_thread(echo_roundtrip, sock, 8 * MiB, 11)
    check_echo(result, 8 * MiB)
    assert len(pair.server.sessions) == 1


# ------------------------------------------------ 11. real twistd processes


class _Lines(threading.Thread):
    """Collects a child process's output lines (so its pipe never fills)."""

    def __init__(self, process: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []

    def run(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {pattern!r} in the output within {timeout:g} s:\n" + "".join(self.seen)
                ) from None
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match


def twistd(*args: str) -> tuple[subprocess.Popen, _Lines]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [str(VENV_BIN / "twistd"), "-n", "--pidfile=", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
    )
    lines = _Lines(process)
    lines.start()
    return process, lines


def stop_process(process: subprocess.Popen, lines: _Lines) -> tuple[str, str]:
    """SIGTERM and wait (kill after 15 s); returns the output and what went wrong.

    twistd shuts down in order (services' ``stopService`` first) and then
    re-raises the signal, so the exit status of a clean stop is -SIGTERM.
    Never raises, so that every process is stopped even if one misbehaves.
    """
    problem = ""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            problem = "did not stop within 15 s of SIGTERM"
    lines.join(5)
    while not lines.lines.empty():
        lines.seen.append(lines.lines.get())
    output = "".join(lines.seen)
    if not problem and process.returncode not in (0, -signal.SIGTERM):
        problem = f"exited with status {process.returncode}"
    if not problem and "Server Shut Down." not in output:
        problem = "did not shut down cleanly"
    return output, problem


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def test_twistd_processes_smoke(keys, tmp_path):
    digest = random_file(tmp_path / "file", 2 * MiB)
    handler = lambda *a: _QuietHandler(*a, directory=str(tmp_path))  # noqa: E731
    web = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    processes: list[tuple[subprocess.Popen, _Lines]] = []
    try:
        processes.append(
            twistd(
                "stripe-server",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--psk-file",
                keys.psk,
                "--cert",
                keys.cert,
                "--key",
                keys.key,
                "--allow",  # the web server below is on loopback, denied by default
                "127.0.0.0/8",
            )
        )
        server_port = processes[0][1].wait_for(r"SubflowFactory \(TLS\) starting on (\d+)")[1]
        processes.append(
            twistd(
                "stripe-client",
                "--server",
                f"127.0.0.1:{server_port}",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--psk-file",
                keys.psk,
                "--server-fingerprint",
                keys.fingerprint,
                "--subflows",
                "4",
            )
        )
        socks_port = processes[1][1].wait_for(r"SocksFactory starting on (\d+)")[1]
        url = f"http://127.0.0.1:{web.server_address[1]}/file"
        proxy = f"127.0.0.1:{socks_port}"
        fetched = subprocess.run(
            ["curl", "-sS", "--fail", "--max-time", "60", "--socks5", proxy, url],
            capture_output=True,
            timeout=90,
        )
    finally:
        stopped = [stop_process(p, lines) for p, lines in reversed(processes)]
        web.shutdown()
        web.server_close()
    logs = "\n".join(f"--- twistd ({problem or 'ok'}):\n{out}" for out, problem in stopped)
    assert not [problem for _, problem in stopped if problem], logs
    assert fetched.returncode == 0, f"curl: {fetched.stderr.decode(errors='replace')}\n{logs}"
    assert hashlib.sha256(fetched.stdout).hexdigest() == digest
    assert "Traceback" not in logs, logs
