"""Traffic programs for the benchmark: a sink/source server, a bulk sender, a TTFB prober.

Run as ``python -m bench.traffic serve|send|ttfb ...``.  They use
only the standard library and non-blocking sockets with :mod:`selectors`, for
two reasons: the load generator must not share a reactor (or a GIL) with the
proxy under test, and one single-threaded loop drives one stream as fast as
a blocking loop while still scaling to a thousand concurrent streams.

Wire format (our own, so it works through any relay, half-close or not):
the connecting side sends a 24-byte header ``b"SPB1"``, mode (1 upload,
2 download), 3 pad bytes, uint64 byte limit (0: none), uint64 time limit in
microseconds (0: none).

- Upload: blocks of uint32 length + data, a zero length ends the stream; the
  sink answers one JSON line ``{"bytes", "first", "last"}`` (its
  ``time.monotonic()`` of the first and last payload byte) and closes.
- Download: the server sends raw bytes until the limit, then half-closes;
  the receiver counts to EOF.

``time.monotonic()`` is CLOCK_MONOTONIC, which is system-wide, so the
orchestrator can compare the timestamps of different processes.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import logging
import math
import resource
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("bench.traffic")

MAGIC = b"SPB1"
HEADER = struct.Struct("!4sB3xQQ")
FRAME = struct.Struct("!I")
MODE_UPLOAD = 1
MODE_DOWNLOAD = 2
CHUNK = 256 * 1024
RECV_BUF = 1 << 20
HELLO = b"H"

_ZEROS = memoryview(bytes(CHUNK))
_FULL_BLOCK = memoryview(FRAME.pack(CHUNK) + bytes(CHUNK))


def raise_fd_limit() -> None:
    """A thousand streams need a few thousand descriptors; the soft limit may be 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_hostport(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into a tuple."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def socks_connect_request(host: str, port: int) -> bytes:
    """An RFC 1928 CONNECT request for ``host:port`` (IPv4, IPv6 or a name)."""
    try:
        addr = b"\x01" + socket.inet_pton(socket.AF_INET, host)
    except OSError:
        try:
            addr = b"\x04" + socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            name = host.encode("idna")
            addr = b"\x03" + bytes([len(name)]) + name
    return b"\x05\x01\x00" + addr + struct.pack("!H", port)


def socks_reply_length(head: bytes) -> int | None:
    """Total length of a SOCKS5 reply given its first bytes, or None if more are needed."""
    if len(head) < 5:
        return None
    atyp = head[3]
    if atyp == 1:
        return 10
    if atyp == 4:
        return 22
    if atyp == 3:
        return 7 + head[4]
    raise ConnectionError(f"bad SOCKS5 reply address type {atyp}")


# ------------------------------------------------------------------ server


@dataclass
class _ServerConn:
    sock: socket.socket
    kind: str  # "main" or "hello"
    state: str = "header"
    inbuf: bytearray = field(default_factory=bytearray)
    need: int = HEADER.size
    bytes: int = 0
    first: float | None = None
    last: float | None = None
    out: memoryview | None = None
    # download
    limit_bytes: int = 0
    deadline: float = 0.0
    sent: int = 0
    # rate limiting (upload)
    consumed: int = 0
    rate_start: float | None = None


class Server:
    """Sink for uploads, source for downloads, and a one-byte greeter for TTFB.

    ``rate`` (bytes/s, 0 = unlimited) limits how fast upload payload is read
    from each connection: the memory scenario uses it to make a slow target
    and check that the proxy pushes back instead of buffering.
    """

    def __init__(self, bind: str, port: int, hello_port: int | None, rate: float) -> None:
        self.sel = selectors.DefaultSelector()
        self.rate = rate
        self.burst = 64 * 1024
        self.buf = bytearray(RECV_BUF)
        self.view = memoryview(self.buf)
        self.timers: list[tuple[float, int, _ServerConn]] = []
        self._seq = 0
        self.main = self._listen(bind, port)
        self.hello = self._listen(bind, hello_port) if hello_port is not None else None
        self.sel.register(self.main, selectors.EVENT_READ, "main")
        if self.hello is not None:
            self.sel.register(self.hello, selectors.EVENT_READ, "hello")

    @staticmethod
    def _listen(bind: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((bind, port))
        s.listen(4096)
        s.setblocking(False)
        return s

    def ports(self) -> dict[str, int]:
        out = {"port": self.main.getsockname()[1]}
        if self.hello is not None:
            out["hello_port"] = self.hello.getsockname()[1]
        return out

    def serve_forever(self) -> None:
        while True:
            timeout = None
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            for key, mask in self.sel.select(timeout):
                if key.data in ("main", "hello"):
                    self._accept(key.fileobj, key.data)  # type: ignore[arg-type]
                else:
                    self._event(key.data, mask)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, conn = heapq.heappop(self.timers)
                if conn.state != "closed":
                    self.sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _accept(self, lsock: socket.socket, kind: str) -> None:
        while True:
            try:
                s, _ = lsock.accept()
            except BlockingIOError:
                return
            s.setblocking(False)
            conn = _ServerConn(s, kind)
            if kind == "hello":
                try:
                    s.send(HELLO)
                except OSError:
                    s.close()
                    continue
                conn.state = "drain"
            self.sel.register(s, selectors.EVENT_READ, conn)

    def _close(self, conn: _ServerConn) -> None:
        if conn.state == "closed":
            return
        conn.state = "closed"
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()

    def _event(self, conn: _ServerConn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._writable(conn)
            if mask & selectors.EVENT_READ and conn.state != "closed":
                self._readable(conn)
        except BlockingIOError:
            pass  # drained the socket; wait for the next event
        except OSError as e:
            log.debug("connection error: %s", e)
            self._close(conn)

    def _read_budget(self, conn: _ServerConn) -> int:
        """Bytes this connection may read now under ``rate``; schedules a wake-up at 0."""
        if not self.rate or conn.state not in ("frame_len", "frame_data"):
            return RECV_BUF
        now = time.monotonic()
        if conn.rate_start is None:
            conn.rate_start = now
        allowed = int(self.burst + self.rate * (now - conn.rate_start) - conn.consumed)
        if allowed >= 4096:
            return min(allowed, RECV_BUF)
        wait = (16384 - allowed) / self.rate
        # selectors cannot watch a socket for nothing: unregister it until the timer
        self.sel.unregister(conn.sock)
        self._seq += 1
        heapq.heappush(self.timers, (now + wait, self._seq, conn))
        return 0

    def _readable(self, conn: _ServerConn) -> None:
        while conn.state != "closed":
            if conn.state in ("header", "frame_len"):
                chunk = conn.sock.recv(conn.need - len(conn.inbuf))
                if not chunk:
                    self._close(conn)
                    return
                conn.inbuf += chunk
                if len(conn.inbuf) < conn.need:
                    continue
                data, conn.inbuf = bytes(conn.inbuf), bytearray()
                if conn.state == "header":
                    self._header(conn, data)
                    if conn.state != "frame_len":
                        return
                else:
                    (n,) = FRAME.unpack(data)
                    conn.consumed += FRAME.size
                    if n == 0:
                        self._reply(conn)
                        return
                    conn.state, conn.need = "frame_data", n
            elif conn.state == "frame_data":
                budget = self._read_budget(conn)
                if budget == 0:
                    return
                n = conn.sock.recv_into(self.view, min(conn.need, budget))
                if n == 0:
                    self._close(conn)
                    return
                now = time.monotonic()
                if conn.first is None:
                    conn.first = now
                conn.last = now
                conn.bytes += n
                conn.consumed += n
                conn.need -= n
                if conn.need == 0:
                    conn.state, conn.need = "frame_len", FRAME.size
            elif conn.state == "drain":
                if not conn.sock.recv(65536):
                    self._close(conn)
                return
            else:
                return

    def _header(self, conn: _ServerConn, data: bytes) -> None:
        magic, mode, limit, micros = HEADER.unpack(data)
        if magic != MAGIC:
            log.warning("bad header %r", data[:8])
            self._close(conn)
            return
        if mode == MODE_UPLOAD:
            conn.state, conn.need = "frame_len", FRAME.size
        elif mode == MODE_DOWNLOAD:
            conn.state = "source"
            conn.limit_bytes = limit
            conn.deadline = time.monotonic() + micros / 1e6 if micros else math.inf
            self.sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        else:
            log.warning("unknown mode %d", mode)
            self._close(conn)

    def _reply(self, conn: _ServerConn) -> None:
        reply = json.dumps({"bytes": conn.bytes, "first": conn.first, "last": conn.last})
        conn.out = memoryview((reply + "\n").encode())
        conn.state = "reply"
        self.sel.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _writable(self, conn: _ServerConn) -> None:
        if conn.state == "reply":
            assert conn.out is not None
            n = conn.sock.send(conn.out)
            conn.out = conn.out[n:]
            if not conn.out:
                self._close(conn)
            return
        if conn.state == "source":
            while True:
                left = conn.limit_bytes - conn.sent if conn.limit_bytes else CHUNK
                if left <= 0 or time.monotonic() >= conn.deadline:
                    conn.sock.shutdown(socket.SHUT_WR)
                    conn.state = "drain"
                    self.sel.modify(conn.sock, selectors.EVENT_READ, conn)
                    return
                try:
                    n = conn.sock.send(_ZEROS[: min(left, CHUNK)])
                except BlockingIOError:
                    return
                conn.sent += n


# ------------------------------------------------------------------ sender


@dataclass
class FlowResult:
    """What one stream of the sender saw; times are ``time.monotonic()``."""

    index: int
    start: float = 0.0
    opened: float | None = None
    end: float | None = None
    bytes: int = 0
    sink: dict[str, Any] | None = None
    error: str | None = None


class _Flow:
    """One connection: optional SOCKS5 handshake, then an upload or a download."""

    def __init__(self, sender: Sender, index: int) -> None:
        self.s = sender
        self.r = FlowResult(index)
        self.sock: socket.socket | None = None
        self.state = "new"
        self.inbuf = bytearray()
        self.out = memoryview(b"")
        self.remaining = sender.bytes_per_stream
        self.deadline = math.inf

    # -- setup
    def start(self) -> None:
        s = self.s
        dest = s.socks or s.target
        family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.r.start = time.monotonic()
        err = self.sock.connect_ex(dest)
        if err not in (0, 115):  # EINPROGRESS
            raise ConnectionError(f"connect to {dest}: errno {err}")
        self.state = "connect"
        s.sel.register(self.sock, selectors.EVENT_WRITE, self)

    @property
    def connecting(self) -> bool:
        return self.state in ("connect", "greet", "request")

    def _want(self, events: int) -> None:
        assert self.sock is not None
        self.s.sel.modify(self.sock, events, self)

    def _opened(self) -> None:
        s = self.s
        self.r.opened = time.monotonic()
        mode = MODE_DOWNLOAD if s.download else MODE_UPLOAD
        micros = int(s.seconds * 1e6) if s.seconds else 0
        header = HEADER.pack(MAGIC, mode, s.bytes_per_stream or 0, micros if s.download else 0)
        self.out = memoryview(header)
        if s.seconds and not s.download:
            self.deadline = self.r.opened + s.seconds
        self.state = "download" if s.download else "upload"
        if s.download:
            self._flush_small()
            self._want(selectors.EVENT_READ)
        else:
            self._want(selectors.EVENT_WRITE)

    def _flush_small(self) -> None:
        """Send a small control message; it always fits a fresh socket's buffer."""
        assert self.sock is not None
        while self.out:
            n = self.sock.send(self.out)
            self.out = self.out[n:]

    # -- events
    def event(self, mask: int) -> None:
        assert self.sock is not None
        if self.state == "connect":
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise ConnectionError(f"connect: errno {err}")
            if self.s.socks:
                self.out = memoryview(b"\x05\x01\x00")
                self._flush_small()
                self.state = "greet"
                self._want(selectors.EVENT_READ)
            else:
                self._opened()
            return
        if self.state in ("greet", "request"):
            self._handshake()
        elif self.state == "upload":
            self._upload()
        elif self.state == "reply":
            self._read_reply()
        elif self.state == "download":
            self._download()

    def _handshake(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(512)
        if not data:
            raise ConnectionError(f"SOCKS server closed during {self.state}")
        self.inbuf += data
        if self.state == "greet":
            if len(self.inbuf) < 2:
                return
            if bytes(self.inbuf[:2]) != b"\x05\x00":
                raise ConnectionError(f"SOCKS5 method refused: {bytes(self.inbuf[:2])!r}")
            del self.inbuf[:2]
            self.out = memoryview(socks_connect_request(*self.s.target))
            self._flush_small()
            self.state = "request"
        if self.state == "request":
            total = socks_reply_length(bytes(self.inbuf))
            if total is None or len(self.inbuf) < total:
                return
            if self.inbuf[1] != 0:
                raise ConnectionError(f"SOCKS5 CONNECT failed with reply {self.inbuf[1]}")
            del self.inbuf[:total]
            self._opened()

    def _next_block(self) -> memoryview | None:
        """The next frame to send, the terminator, or None when all is sent."""
        if self.state != "upload":
            return None
        if self.s.seconds:
            if time.monotonic() < self.deadline:
                self.r.bytes += CHUNK
                return _FULL_BLOCK
        elif self.remaining >= CHUNK:
            self.remaining -= CHUNK
            self.r.bytes += CHUNK
            return _FULL_BLOCK
        elif self.remaining > 0:
            n, self.remaining = self.remaining, 0
            self.r.bytes += n
            return memoryview(FRAME.pack(n) + bytes(n))
        self.state = "terminate"
        return memoryview(FRAME.pack(0))

    def _upload(self) -> None:
        assert self.sock is not None
        while True:
            if not self.out:
                block = self._next_block()
                if block is None:
                    self.state = "reply"
                    self._want(selectors.EVENT_READ)
                    return
                self.out = block
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                return
            self.out = self.out[n:]
            if not self.out and self.state == "terminate":
                self.state = "reply"
                self._want(selectors.EVENT_READ)
                return

    def _read_reply(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(4096)
        if not data:
            raise ConnectionError("sink closed before replying")
        self.inbuf += data
        if b"\n" in self.inbuf:
            self.r.end = time.monotonic()
            self.r.sink = json.loads(bytes(self.inbuf).split(b"\n", 1)[0])
            if self.r.sink["bytes"] != self.r.bytes:
                raise ConnectionError(f"sent {self.r.bytes} bytes, sink got {self.r.sink['bytes']}")
            self.finish()

    def _download(self) -> None:
        assert self.sock is not None
        view = self.s.view
        while True:
            try:
                n = self.sock.recv_into(view)
            except BlockingIOError:
                return
            if n == 0:
                self.r.end = time.monotonic()
                self.finish()
                return
            self.r.bytes += n

    def finish(self, error: str | None = None) -> None:
        if self.state == "done":
            return
        self.state = "done"
        self.r.error = error
        if self.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.s.sel.unregister(self.sock)
            self.sock.close()
        self.s.finished(self)


class Sender:
    """Runs ``streams`` flows at once (at most ``max_connecting`` in setup at a time).

    Capping concurrent handshakes keeps a burst of a thousand CONNECTs from
    overflowing a listener's accept backlog, which would add SYN-retry
    seconds that are the kernel's doing, not the proxy's.
    """

    def __init__(
        self,
        target: tuple[str, int],
        socks: tuple[str, int] | None,
        streams: int,
        bytes_per_stream: int,
        seconds: float,
        download: bool,
        max_connecting: int = 32,
        timeout: float = 600.0,
    ) -> None:
        self.target = target
        self.socks = socks
        self.bytes_per_stream = bytes_per_stream
        self.seconds = seconds
        self.download = download
        self.max_connecting = max_connecting
        self.timeout = timeout
        self.sel = selectors.DefaultSelector()
        self.view = memoryview(bytearray(RECV_BUF))
        self.pending = [_Flow(self, i) for i in range(streams)]
        self.pending.reverse()
        self.active: set[_Flow] = set()
        self.results: list[FlowResult] = []

    def finished(self, flow: _Flow) -> None:
        self.active.discard(flow)
        self.results.append(flow.r)

    def _start_more(self) -> None:
        connecting = sum(1 for f in self.active if f.connecting)
        while self.pending and connecting < self.max_connecting:
            flow = self.pending.pop()
            self.active.add(flow)
            try:
                flow.start()
            except OSError as e:
                flow.finish(str(e))
                continue
            connecting += 1

    def run(self) -> list[FlowResult]:
        give_up = time.monotonic() + self.timeout
        self._start_more()
        while self.active or self.pending:
            if time.monotonic() > give_up:
                for f in list(self.active):
                    f.finish("timed out")
                break
            for key, mask in self.sel.select(1.0):
                flow: _Flow = key.data
                try:
                    flow.event(mask)
                except (OSError, ValueError) as e:
                    flow.finish(f"{flow.state}: {e}")
            if self.pending:
                self._start_more()
        self.results.sort(key=lambda r: r.index)
        return self.results


def summarize_flows(results: list[FlowResult]) -> dict[str, Any]:
    """Aggregate of a sender run: total bytes over first start .. last end."""
    ok = [r for r in results if r.error is None and r.end is not None]
    errors = [r.error for r in results if r.error is not None]
    out: dict[str, Any] = {"streams": len(results), "errors": errors[:5], "n_errors": len(errors)}
    if ok:
        t0 = min(r.opened or r.start for r in ok)
        t1 = max(r.end for r in ok if r.end is not None)
        total = sum(r.bytes for r in ok)
        out.update(
            bytes=total,
            start=t0,
            end=t1,
            seconds=t1 - t0,
            flows=[
                {
                    "bytes": r.bytes,
                    "setup": (r.opened or r.start) - r.start,
                    "seconds": (r.end or 0.0) - (r.opened or r.start),
                }
                for r in ok
            ],
        )
    return out


# ------------------------------------------------------------------ TTFB


def _recv_exact(sock: socket.socket, n: int, quickack: bool = False) -> bytes:
    buf = b""
    while len(buf) < n:
        if quickack:  # not sticky: the kernel may leave quick-ACK mode after a read
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed early")
        buf += chunk
    return buf


def ttfb_once(
    target: tuple[str, int],
    socks: tuple[str, int] | None,
    timeout: float,
    quickack: bool = False,
) -> float:
    """Seconds from connect() to the target's first byte, through SOCKS5 if given.

    ``quickack`` makes this side acknowledge every segment at once instead of
    delaying ACKs: a diagnostic, since a peer whose small writes wait for an
    ACK (Nagle) then stops waiting, and the difference shows that it did.
    """
    t0 = time.perf_counter()
    with socket.create_connection(socks or target, timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if socks:
            s.sendall(b"\x05\x01\x00")
            if _recv_exact(s, 2, quickack) != b"\x05\x00":
                raise ConnectionError("SOCKS5 method refused")
            s.sendall(socks_connect_request(*target))
            head = _recv_exact(s, 5, quickack)
            total = socks_reply_length(head)
            assert total is not None
            _recv_exact(s, total - 5, quickack)
            if head[1] != 0:
                raise ConnectionError(f"SOCKS5 CONNECT failed with reply {head[1]}")
        if _recv_exact(s, 1, quickack) != HELLO:
            raise ConnectionError("unexpected first byte")
        return time.perf_counter() - t0


def connect_time_once(target: tuple[str, int], timeout: float) -> float:
    """Seconds for a bare TCP connect(): one round trip, the path's RTT."""
    t0 = time.perf_counter()
    with socket.create_connection(target, timeout=timeout):
        return time.perf_counter() - t0


def run_ttfb(
    probe: Callable[[], float], count: int, parallel: int
) -> tuple[list[float], list[str], float]:
    """``count`` probes over ``parallel`` threads; returns (latencies, errors, wall seconds)."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(count))

    def worker() -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            try:
                v = probe()
            except OSError as e:
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                latencies.append(v)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(max(1, parallel))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - t0


# ------------------------------------------------------------------ CLI


def _size(text: str) -> int:
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the traffic programs; results go to stdout as one JSON line."""
    ap = argparse.ArgumentParser(prog="python -m bench.traffic")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve", help="sink/source server (prints its ports as JSON)")
    sv.add_argument("--bind", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=0)
    sv.add_argument("--hello-port", type=int, default=None, help="also greet here (0: any)")
    sv.add_argument("--rate", type=float, default=0.0, help="read at most this many bytes/s")
    sd = sub.add_parser("send", help="bulk upload or download")
    sd.add_argument("--target", type=parse_hostport, required=True)
    sd.add_argument("--socks", type=parse_hostport)
    sd.add_argument("--streams", type=int, default=1)
    sd.add_argument("--bytes", type=_size, default=0, help="per stream (K/M/G are binary)")
    sd.add_argument("--time", type=float, default=0.0, help="seconds of sending instead")
    sd.add_argument("--download", action="store_true")
    sd.add_argument("--max-connecting", type=int, default=32)
    sd.add_argument("--timeout", type=float, default=600.0)
    tt = sub.add_parser("ttfb", help="connect-to-first-byte latencies")
    tt.add_argument("--target", type=parse_hostport, required=True)
    tt.add_argument("--socks", type=parse_hostport)
    tt.add_argument("--count", type=int, default=200)
    tt.add_argument("--parallel", type=int, default=1)
    tt.add_argument("--connect-only", action="store_true", help="bare TCP connect time")
    tt.add_argument("--quickack", action="store_true", help="ACK at once (diagnostic)")
    tt.add_argument("--timeout", type=float, default=30.0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    raise_fd_limit()
    if a.cmd == "serve":
        hello = a.hello_port
        server = Server(a.bind, a.port, hello, a.rate)
        print(json.dumps(server.ports()), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
        return 0
    if a.cmd == "send":
        if bool(a.bytes) == bool(a.time):
            ap.error("send: give exactly one of --bytes and --time")
        sender = Sender(
            a.target, a.socks, a.streams, a.bytes, a.time, a.download, a.max_connecting, a.timeout
        )
        print(json.dumps(summarize_flows(sender.run())), flush=True)
        return 0
    if a.connect_only:

        def probe() -> float:
            return connect_time_once(a.target, a.timeout)
    else:

        def probe() -> float:
            return ttfb_once(a.target, a.socks, a.timeout, a.quickack)

    latencies, errors, wall = run_ttfb(probe, a.count, a.parallel)
    print(
        json.dumps(
            {"latencies": latencies, "errors": errors[:5], "n_errors": len(errors), "wall": wall}
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
