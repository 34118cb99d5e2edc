"""Logs that cannot be forged (issue 10 item 6): hostile target names through a real pair.

A SOCKS client chooses the target name, byte for byte (``curl --socks5-hostname``
semantics: the name goes to the server unresolved).  Every line the server
writes about it, in the main log and in the access log, must show the name
escaped and hold no raw control character; per-stream lines stay out of the
main log unless asked for; ``--access-log`` writes one line per stream in its
documented format.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from helpers import (
    SOCKET_TIMEOUT,
    Cleanup,
    EchoFactory,
    Keys,
    Pair,
    _recv_exactly,
    in_thread,
    server_argv,
    start_pair,
    start_target,
    wait_for,
)
from twisted.internet import reactor
from twisted.internet._resolver import HostResolution
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python import usage
from zope.interface import implementer

from stripeproxy.cli import server_tap
from stripeproxy.core import socks5, wire
from stripeproxy.core.session import SessionConfig
from stripeproxy.net.access import ACCESS_FORMAT, StreamRecords, stream_levels
from stripeproxy.net.registry import SessionRegistry
from stripeproxy.net.server import ServerSettings

# (name as the SOCKS client sends it, how every log line must show it as host:port
# without the port: a name with a colon is bracketed like an IPv6 address)
HOSTILE = [
    pytest.param(
        "evil.example\n2026-12-01T00:00:00+0000 [stripeproxy#info] forged",
        "[evil.example\\x0a2026-12-01T00:00:00+0000 [stripeproxy#info] forged]",
        id="newline-forged-line",
    ),
    pytest.param("cr\r\nlf.example", "cr\\x0d\\x0alf.example", id="crlf"),
    pytest.param(
        "\x1b[2J\x1b]0;pwned\x07esc.example",
        "\\x1b[2J\\x1b]0;pwned\\x07esc.example",
        id="escape-sequences",
    ),
    pytest.param("[bold]loud[/bold].example", "[bold]loud[/bold].example", id="markup"),
    pytest.param("back\\x0aslash.example", "back\\\\x0aslash.example", id="backslash"),
    pytest.param("del\x7f.example", "del\\x7f.example", id="del"),
    pytest.param("tab\there.example", "tab\\x09here.example", id="tab"),
    # The longest SOCKS5 name, in labels of 63 (the most a DNS label may hold).
    pytest.param(".".join(["x" * 63] * 4), ".".join(["x" * 63] * 4), id="255-bytes"),
]
NAMES = [p.values for p in HOSTILE]

# One access-log line (README "Access log"); named groups are checked per test.
ACCESS_LINE = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)"
    r" session=(?P<session>[0-9a-f]{8}) key=(?P<key>\S+) client=(?P<client>\S+)"
    r" stream=(?P<stream>\d+) target=(?P<target>\S+) reply=(?P<reply>0x[0-9a-f]{2}|-)"
    r" result=(?P<result>closed|reset|idle|failed) up=(?P<up>\d+) down=(?P<down>\d+)"
    r" duration=(?P<duration>\d+\.\d{3})"
)


def raw_control(text: str) -> list[str]:
    """The characters of ``text`` a log line must never hold (controls, separators)."""
    return [repr(ch) for ch in text if not ch.isprintable()]


@pytest.fixture
def stream_lines() -> Iterator[None]:
    """Let the per-stream debug lines through to the global log for one test."""
    stream_levels.setLogLevelForNamespace("stripeproxy.streams", LogLevel.debug)
    try:
        yield
    finally:
        stream_levels.clearLogLevels()


@implementer(IHostnameResolver)
class _Resolver:
    """Every name resolves to ``address`` (the echo target), except those in ``others``."""

    def __init__(self, address: str, others: dict[str, str] | None = None) -> None:
        self.address = address
        self.others = others or {}
        self.asked: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> HostResolution:
        self.asked.append(hostName)
        resolution = HostResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        address = self.others.get(hostName, self.address)
        resolutionReceiver.addressResolved(IPv4Address("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


class _MetadataOrReal(_Resolver):
    """Names starting ``[meta]`` resolve to cloud metadata (denied by default);
    the others go to the reactor's real resolver."""

    def __init__(self) -> None:
        super().__init__("169.254.169.254")

    def resolveHostName(
        self, resolutionReceiver: IResolutionReceiver, hostName: str, *args: Any, **kwargs: Any
    ) -> HostResolution:
        if hostName.startswith("[meta]"):
            return super().resolveHostName(resolutionReceiver, hostName, *args, **kwargs)
        resolution: HostResolution = reactor.nameResolver.resolveHostName(
            resolutionReceiver, hostName, *args, **kwargs
        )
        return resolution


class _ResolvingReactor:
    """The real reactor with another name resolver, for one server's settings."""

    def __init__(self, resolver: _Resolver) -> None:
        self.nameResolver = resolver

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


def fake_dns(pair: Pair, resolver: _Resolver) -> None:
    pair.server.registry.settings.reactor = _ResolvingReactor(resolver)


def socks_exchange(socks_port: int, name: bytes, port: int, payload: bytes) -> tuple[int, bytes]:
    """CONNECT to ``name`` by hand (domain-name form, as ``--socks5-hostname``);
    on success send ``payload``, half-close, read to the end. (reply, echoed bytes)."""
    with socket.create_connection(("127.0.0.1", socks_port), timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert _recv_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
        head = _recv_exactly(sock, 4)
        if head[1] != socks5.REPLY_SUCCEEDED:
            return head[1], b""
        assert head[3] == 1, "the server's bound address is IPv4 on loopback"
        _recv_exactly(sock, 6)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        echoed = b""
        while chunk := sock.recv(65536):
            echoed += chunk
        return head[1], echoed


def access_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def parsed(line: str) -> dict[str, str]:
    match = ACCESS_LINE.fullmatch(line)
    assert match is not None, f"not an access-log line: {line!r}"
    return match.groupdict()


# -------------------------------------------------------------------- the table


@pytest_twisted.ensureDeferred
async def test_hostile_target_names_are_escaped_in_every_log_line(
    cleanup: Cleanup, keys: Keys, tmp_path: Path, log_messages: list[str], stream_lines: None
) -> None:
    target = await start_target(cleanup, EchoFactory())
    access = tmp_path / "access.log"
    pair = await start_pair(cleanup, keys, False, k=2, server_extra=["--access-log", str(access)])
    fake_dns(pair, _Resolver("127.0.0.1"))
    del log_messages[:]  # what the pair said while starting is not about streams
    for name, _ in NAMES:
        reply, echoed = await in_thread(
            socks_exchange, pair.socks_port, name.encode(), target.port, b"ping"
        )
        assert (reply, echoed) == (socks5.REPLY_SUCCEEDED, b"ping"), repr(name)
    await wait_for(lambda: len(access_lines(access)) == len(NAMES), "one access line per stream")

    # No log line holds a raw control character, so none can forge another line.
    for message in log_messages:
        assert not raw_control(message), message
    lines = access_lines(access)
    for line in lines:
        assert not raw_control(line), line
    assert len(lines) == len(NAMES)  # one per stream: no forged line in the file
    for (name, escaped), line in zip(NAMES, lines, strict=True):
        suffix = f":{target.port}"
        # The main log (debug line, let through here) shows the escaped name once.
        opened = [m for m in log_messages if m.endswith(f" -> {escaped}{suffix}")]
        assert len(opened) == 1, (name, [m for m in log_messages if "->" in m])
        fields = parsed(line)
        assert fields["target"] == escaped.replace(" ", "\\x20") + suffix, name
        assert (fields["reply"], fields["result"], fields["up"], fields["down"]) == (
            "0x00",
            "closed",
            "4",
            "4",
        )


@pytest_twisted.ensureDeferred
async def test_failed_dials_of_hostile_names_are_escaped_once_and_answered_at_once(
    cleanup: Cleanup, keys: Keys, tmp_path: Path, log_messages: list[str], stream_lines: None
) -> None:
    """The real resolver, and a name resolving to a denied address: the failure line
    and the access line quote the name escaped exactly once; a name getaddrinfo
    refuses to look up (a label over 63 bytes) is answered at once, not left to hang."""
    access = tmp_path / "access.log"
    pair = await start_pair(
        cleanup,
        keys,
        False,
        k=2,
        # Long enough that a stream left hanging fails the wait below.
        client_extra=["--open-timeout", "30"],
        server_extra=["--access-log", str(access)],
    )
    cases = [
        # (name, reply, escaped form in the failure line)
        ("nx\nforged.invalid", socks5.REPLY_HOST_UNREACHABLE, "nx\\x0aforged.invalid"),
        # getaddrinfo would raise on these, not fail the lookup: refused before it.
        ("nul\x00byte.example", socks5.REPLY_HOST_UNREACHABLE, "nul\\x00byte.example"),
        ("a" * 64 + ".invalid", socks5.REPLY_HOST_UNREACHABLE, "a" * 64 + ".invalid"),
        ("x" * 255, socks5.REPLY_HOST_UNREACHABLE, "x" * 255),
        ("[meta]\ndata.example", socks5.REPLY_NOT_ALLOWED, "[meta]\\x0adata.example"),
    ]
    fake_dns(pair, _MetadataOrReal())
    del log_messages[:]
    for name, expected, _ in cases:
        reply, _echoed = await in_thread(socks_exchange, pair.socks_port, name.encode(), 80, b"")
        assert reply == expected, repr(name)
    await wait_for(lambda: len(access_lines(access)) == len(cases), "one access line per stream")
    for message in log_messages:
        assert not raw_control(message), message
    failures = [m for m in log_messages if " failed: " in m]
    for (name, code, escaped), line in zip(cases, access_lines(access), strict=True):
        quoting = [m for m in failures if escaped in m]
        assert len(quoting) == 1, (name, failures)
        assert "\\\\" not in quoting[0], "escaped twice"
        fields = parsed(line)
        assert (fields["reply"], fields["result"]) == (f"0x{code:02x}", "failed"), name
        assert fields["target"] == f"{escaped}:80"


@pytest_twisted.ensureDeferred
async def test_a_name_the_client_refuses_is_logged_escaped(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    """U+2028 (a line separator to many log viewers) is not ASCII: the client's SOCKS
    front end refuses the name, and its line about it quotes the bytes escaped."""
    pair = await start_pair(cleanup, keys, False, k=1)
    del log_messages[:]
    name = "line\u2028sep.example\u202e".encode()
    reply, _ = await in_thread(socks_exchange, pair.socks_port, name, 80, b"")
    assert reply == socks5.REPLY_GENERAL_FAILURE
    refused = [m for m in log_messages if "not ASCII" in m]
    assert len(refused) == 1, log_messages
    assert "\u2028" not in refused[0] and "\u202e" not in refused[0]
    # The reason quotes the bytes with repr(), escaped once more for the log: safe, if verbose.
    assert "xe2" in refused[0] and "xa8" in refused[0]
    for message in log_messages:
        assert not raw_control(message), message


# ------------------------------------------------------------ default and format


@pytest_twisted.ensureDeferred
async def test_single_streams_stay_out_of_the_main_log_by_default(
    cleanup: Cleanup, keys: Keys, log_messages: list[str]
) -> None:
    target = await start_target(cleanup, EchoFactory())
    pair = await start_pair(cleanup, keys, False, k=2)
    resolver = _Resolver("127.0.0.1")
    fake_dns(pair, resolver)
    del log_messages[:]
    reply, echoed = await in_thread(
        socks_exchange, pair.socks_port, b"quiet.example", target.port, b"hello"
    )
    assert (reply, echoed) == (socks5.REPLY_SUCCEEDED, b"hello")
    await in_thread(socks_exchange, pair.socks_port, b"[meta].example", 1, b"")
    assert {"quiet.example", "[meta].example"} <= set(resolver.asked)  # both reached the server
    assert not [m for m in log_messages if "example" in m], log_messages


@pytest_twisted.ensureDeferred
async def test_access_log_format(cleanup: Cleanup, keys: Keys, tmp_path: Path) -> None:
    """The documented line, field by field, for a clean stream, a reset one and a failed dial."""
    target = await start_target(cleanup, EchoFactory())
    access = tmp_path / "logs" / "access.log"
    access.parent.mkdir()
    pair = await start_pair(cleanup, keys, False, k=2, server_extra=["--access-log", str(access)])
    fake_dns(pair, _Resolver("127.0.0.1", {"denied.example": "127.0.0.1"}))
    reply, echoed = await in_thread(
        socks_exchange, pair.socks_port, b"echo.example", target.port, b"x" * 1000
    )
    assert (reply, echoed) == (socks5.REPLY_SUCCEEDED, b"x" * 1000)
    refused, _ = await in_thread(socks_exchange, pair.socks_port, b"nowhere.example", 1, b"")
    assert refused == socks5.REPLY_CONNECTION_REFUSED  # the fake resolver's 127.0.0.1, port 1
    await wait_for(lambda: len(access_lines(access)) == 2, "two access lines")
    first, second = (parsed(line) for line in access_lines(access))
    (key_id,) = pair.server.registry.settings.keys
    session = pair.server_driver().label
    assert first["session"] == second["session"] == session
    assert first["key"] == (key_id or "-") and first["client"] == "127.0.0.1"
    assert int(second["stream"]) > int(first["stream"])
    assert first["target"] == f"echo.example:{target.port}"
    assert (first["reply"], first["result"], first["up"], first["down"]) == (
        "0x00",
        "closed",
        "1000",
        "1000",
    )
    assert (second["target"], second["reply"], second["result"]) == (
        "nowhere.example:1",
        "0x05",
        "failed",
    )
    assert (second["up"], second["down"]) == ("0", "0")
    assert float(first["duration"]) >= 0.0


def test_the_access_format_string_and_the_pattern_agree() -> None:
    """StreamRecords writes through ACCESS_FORMAT; the pattern above reads it back,
    a 300-byte name cut and escaped into one field."""
    events: list[dict[str, Any]] = []
    records = StreamRecords(events.append, "0123abcd", "key one", "203.0.113.9\n")
    records.opened(5, " \x00" + "y" * 300 + ":443", 10.0)
    records.ended(5, "reset", 12.5)
    records.ended(5, "reset", 13.0)  # once only
    assert len(events) == 1 and events[0]["log_format"] == ACCESS_FORMAT
    events[0]["log_time"] = 0.0
    from stripeproxy.net.access import access_line

    line = access_line(events[0])
    assert line.endswith("\n") and line.count("\n") == 1
    fields = parsed(line[:-1])
    assert fields["time"] == "1970-01-01T00:00:00.000Z"
    assert fields["key"] == "key\\x20one" and fields["client"] == "203.0.113.9\\x0a"
    # Cut at TARGET_LIMIT (263) characters: no real SOCKS5 target is that long.
    assert fields["target"] == "\\x20\\x00" + "y" * 261 + "…"
    assert (fields["reply"], fields["result"], fields["duration"]) == ("-", "reset", "2.500")


def test_an_unwritable_access_log_is_a_one_line_usage_error(keys: Keys, tmp_path: Path) -> None:
    path = tmp_path / "missing" / "access.log"
    options = server_tap.Options()
    with pytest.raises(usage.UsageError) as raised:
        options.parseOptions(server_argv(keys, False, ["--access-log", str(path)]))
    assert str(raised.value) == f"--access-log {path}: No such file or directory"


# ---------------------------------------------------- the --max-sessions limit


class _Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def warn(self, format: str, **kwargs: Any) -> None:
        self.lines.append(format.format(**kwargs))

    info = warn


def test_the_server_wide_session_limit_is_logged_once_per_interval_with_the_count() -> None:
    clock = Clock()
    settings = ServerSettings(
        reactor=clock,
        keys={},
        config=SessionConfig(grace_period=1000.0),  # sessions without subflows stay
        max_sessions=2,
        sessions_per_key=0,
        session_creations_per_key=0,
    )
    registry = SessionRegistry(settings)
    log = registry.admission.log = _Recorder()
    created = [registry.attach(f"k{i}", b"s" * 16, 0, "198.51.100.1")[1] for i in range(2)]
    assert created == [wire.WELCOME_CREATED] * 2
    for i in range(5):
        clock.advance(1)
        assert registry.attach(f"late{i}", b"t" * 16, 0, "198.51.100.2\n") == (
            None,
            wire.REJECT_TOO_MANY_SESSIONS,
        )
    assert len(log.lines) == 1
    assert "2 sessions, the server's limit (--max-sessions)" in log.lines[0]
    assert "from 198.51.100.2\\x0a" in log.lines[0]  # the address, escaped
    clock.advance(60)
    registry.attach("later", b"u" * 16, 0, "198.51.100.3")
    assert len(log.lines) == 2 and "(4 more since the last such line)" in log.lines[1]
    for driver in list(registry.sessions.values()):
        driver.close("test over")
