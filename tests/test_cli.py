"""The taps as an operator meets them: defaults, errors, help, exposure.

- Every option with a config counterpart defaults to the dataclass's value.
- A listener that cannot listen ends a real ``twistd`` process with status 1
  and one line naming the address and the reason.
- Usage errors and bad files are one line, the reason first, no traceback,
  no dump of the options; ``--help`` says what is required and shows an
  example.
- SOCKS credentials (from a file, RFC 1929 lengths) and listeners reachable
  beyond this host.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogEvent, Logger, formatEvent
from twisted.python.usage import UsageError

from stripeproxy.cli import client_tap, server_tap
from stripeproxy.cli.listen import ListenFailed, ListenService, loopback_only
from stripeproxy.cli.options import MIN_MAX_FRAME_KIB, default_of, warn_if_exposed
from stripeproxy.core.session import SessionConfig
from stripeproxy.net.client import ClientSettings
from stripeproxy.net.server import ServerSettings
from tests.helpers import REPO, VENV_BIN, Keys

# A process that should exit at once gets this long before the test gives up
# (a guard against hanging, not a timing assertion).
PROCESS_GUARD = 60


def client_options(keys: Keys, *extra: str) -> client_tap.Options:
    options = client_tap.Options()
    options.parseOptions(["--psk-file", keys.psk, "--server-fingerprint", keys.fingerprint, *extra])
    return options


def server_options(keys: Keys, *extra: str) -> server_tap.Options:
    options = server_tap.Options()
    options.parseOptions(["--psk-file", keys.psk, "--cert", keys.cert, "--key", keys.key, *extra])
    return options


def fields_of(settings: Any, leave_out: set[str]) -> dict[str, Any]:
    return {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if f.name not in leave_out
    }


# ------------------------------------------------------------ one source of defaults


def test_client_defaults_are_the_dataclass_defaults(keys: Keys) -> None:
    """Parsing only the required options gives ``ClientSettings()`` and ``SessionConfig()``."""
    settings = client_tap.client_settings(client_options(keys), reactor=None)
    expected = ClientSettings(reactor=None, psk=settings.psk, key_id=settings.key_id)
    assert settings.config == SessionConfig()
    leave_out = {"reactor", "psk", "key_id", "config"}  # required or built above
    assert fields_of(settings, leave_out) == fields_of(expected, leave_out)


def test_server_defaults_are_the_dataclass_defaults(keys: Keys) -> None:
    settings = server_tap.server_settings(server_options(keys), reactor=None)
    expected = ServerSettings(reactor=None, keys=settings.keys)
    assert settings.config == SessionConfig()
    # policy: built from --allow/--deny; handshakes_per_address: derived
    # from --subflows and --max-handshakes, not an option of its own;
    # local_addresses: read from this host's interfaces.
    leave_out = {"reactor", "keys", "config", "policy", "handshakes_per_address", "local_addresses"}
    assert fields_of(settings, leave_out) == fields_of(expected, leave_out)


@pytest.mark.parametrize(
    ("tap", "option", "cls", "name", "unit"),
    [
        (client_tap, "idle-timeout", SessionConfig, "idle_timeout", 1),
        (server_tap, "idle-timeout", SessionConfig, "idle_timeout", 1),
        (client_tap, "scheduler", SessionConfig, "scheduler", 1),
        (server_tap, "scheduler", SessionConfig, "scheduler", 1),
        (server_tap, "session-window", SessionConfig, "session_window", 1024 * 1024),
        (server_tap, "max-streams", SessionConfig, "max_streams", 1),
        (client_tap, "open-timeout", ClientSettings, "open_timeout", 1),
        (client_tap, "connect-wait", ClientSettings, "connect_wait", 1),
        (client_tap, "drain-timeout", ClientSettings, "drain_timeout", 1),
        (client_tap, "max-frame", ClientSettings, "max_frame", 1024),
        (server_tap, "max-frame", ServerSettings, "max_frame", 1024),
        (server_tap, "memory-limit", ServerSettings, "memory_limit", 1024 * 1024),
    ],
)
def test_help_shows_the_dataclass_default(
    tap: Any, option: str, cls: type[Any], name: str, unit: int
) -> None:
    """What ``--help`` prints as the default is the value the code uses."""
    (field,) = [f for f in dataclasses.fields(cls) if f.name == name]
    assert tap.Options().defaults[option] * unit == field.default


def test_default_of_refuses_a_field_without_a_plain_default() -> None:
    with pytest.raises(TypeError, match="no plain default"):
        default_of(ServerSettings, "policy")  # a default_factory
    assert default_of(ServerSettings, "memory_limit", 1024 * 1024) == 1024


def test_smallest_frame_limit_follows_the_chunk_size() -> None:
    assert MIN_MAX_FRAME_KIB == 65
    assert SessionConfig().chunk_size == (MIN_MAX_FRAME_KIB - 1) * 1024


# ------------------------------------------------------------ usage errors, in process


@pytest.fixture
def not_pem(tmp_path: Path) -> str:
    path = tmp_path / "not.pem"
    path.write_text("hello\n")
    return str(path)


def usage_cases(keys: Keys, not_pem: str, tmp_path: Path) -> list[tuple[Any, list[str], str]]:
    missing = str(tmp_path / "missing.pem")
    tls_server = ["--psk-file", keys.psk]
    client = ["--psk-file", keys.psk, "--server-fingerprint", keys.fingerprint]
    return [
        (server_tap, [*tls_server, "--cert", missing, "--key", keys.key], f"^--cert {missing}: "),
        (server_tap, [*tls_server, "--cert", not_pem, "--key", keys.key], "no usable PEM cert"),
        (server_tap, [*tls_server, "--cert", keys.cert, "--key", missing], f"^--key {missing}: "),
        (server_tap, [*tls_server, "--cert", keys.cert, "--key", not_pem], "^--key .*private key"),
        (
            server_tap,
            [*tls_server, "--cert", keys.cert, "--key", keys.key, "--client-ca", missing],
            f"^--client-ca {missing}: No such file",
        ),
        (server_tap, ["--no-tls", "--psk-file", missing], f"^--psk-file {missing}: No such"),
        (server_tap, ["--no-tls"], "^--psk-file is required"),
        (client_tap, [*client, "--ca", missing], f"^--ca {missing}: No such file"),
        (client_tap, [*client, "--ca", not_pem], f"^--ca {not_pem}: no usable PEM"),
        (
            client_tap,
            ["--psk-file", keys.psk, "--server-fingerprint", "AB:CD"],
            "^--server-fingerprint: not a SHA-256 certificate fingerprint",
        ),
        (
            client_tap,
            [*client, "--client-cert", keys.cert, "--client-key", missing],
            f"^--client-key {missing}: No such file",
        ),
    ]


def test_bad_files_and_values_are_one_line_reason_first(
    keys: Keys, not_pem: str, tmp_path: Path
) -> None:
    for tap, argv, reason in usage_cases(keys, not_pem, tmp_path):
        with pytest.raises(UsageError, match=reason) as raised:
            tap.Options().parseOptions(argv)
        assert "\n" not in str(raised.value), argv


# ------------------------------------------------------------ SOCKS credentials


@pytest.mark.parametrize(("content", "password"), [("s3cret\n", "s3cret"), ("pa ss\r\n", "pa ss")])
def test_socks_password_file_is_read_without_its_newline(
    keys: Keys, tmp_path: Path, content: str, password: str
) -> None:
    path = tmp_path / "socks.pass"
    path.write_text(content)
    options = client_options(keys, "--socks-user", "alice", "--socks-password-file", str(path))
    settings = client_tap.client_settings(options, reactor=None)
    assert settings.socks_credentials == (b"alice", password.encode())


def test_socks_credential_errors(keys: Keys, tmp_path: Path) -> None:
    empty = tmp_path / "empty.pass"
    empty.write_text("\n")
    good = tmp_path / "good.pass"
    good.write_text("pw\n")
    long_user = "é" * 128  # 256 bytes in UTF-8
    cases = [
        (["--socks-user", "a", "--socks-password-file", str(empty)], "is empty"),
        (
            ["--socks-user", "a", "--socks-password", "x", "--socks-password-file", str(good)],
            "not both",
        ),
        (["--socks-user", "a", "--socks-password-file", str(tmp_path / "no")], "No such file"),
        (["--socks-user", "a"], "go together"),
        (["--socks-user", long_user, "--socks-password", "x"], "--socks-user is 256 bytes"),
        (["--socks-user", "a", "--socks-password", "p" * 256], "--socks-password is 256 bytes"),
    ]
    for extra, reason in cases:
        with pytest.raises(UsageError, match=reason):
            client_options(keys, *extra)
    # 255 bytes is allowed (RFC 1929's limit).
    client_options(keys, "--socks-user", "u" * 255, "--socks-password", "p" * 255)


@pytest.mark.parametrize(
    "listen", [":1080", "0.0.0.0:1080", "[::]:1080", "192.0.2.7:1080", "tcp:1080", "systemd:0"]
)
def test_open_socks_is_refused_unless_forced(keys: Keys, tmp_path: Path, listen: str) -> None:
    with pytest.raises(UsageError, match=r"beyond this host .* --allow-open-socks"):
        client_options(keys, "--listen", listen)
    options = client_options(keys, "--listen", listen, "--allow-open-socks")
    assert options["listen"] == listen
    password = tmp_path / "socks.pass"
    password.write_text("pw\n")
    client_options(
        keys, "--listen", listen, "--socks-user", "a", "--socks-password-file", str(password)
    )


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("127.0.0.1:1080", True),
        ("127.0.0.2:1080", True),
        ("[::1]:1080", True),
        ("[::ffff:127.0.0.1]:1080", True),
        ("localhost:1080", True),
        ("LOCALHOST:1080", True),
        (":1080", False),
        ("0.0.0.0:1080", False),
        ("[::]:1080", False),
        ("192.0.2.1:1080", False),
        ("proxy.example.net:1080", False),
        ("tcp:1080", False),
        ("tcp:1080:interface=0.0.0.0", False),
        ("tcp:1080:interface=127.0.0.1", True),
        ("tcp:0:backlog=5:interface=127.0.0.1", True),
        (r"tcp6:1080:interface=\:\:1", True),
        ("tcp6:1080", False),
        ("unix:/run/stripe.sock", True),
        ("haproxy:tcp:1080:interface=127.0.0.1", True),
        ("haproxy:tcp:1080", False),
        ("systemd:domain=INET:index=0", None),
    ],
)
def test_loopback_only(address: str, local: bool | None) -> None:
    assert loopback_only(address) is local


@pytest.mark.parametrize(("address", "warned"), [(":9101", True), ("127.0.0.1:9101", False)])
def test_metrics_beyond_loopback_is_warned_about(address: str, warned: bool) -> None:
    events: list[LogEvent] = []
    warn_if_exposed(Logger(observer=events.append), "--metrics", address)
    messages = [formatEvent(e) for e in events]
    assert len(messages) == (1 if warned else 0)
    if warned:
        assert messages[0].startswith(f"--metrics {address} is reachable beyond this host")


def test_server_warns_about_open_metrics_when_built(keys: Keys, log_messages: list[str]) -> None:
    server_tap.makeService(server_options(keys, "--metrics", "tcp:0", "--no-tui"))
    assert sum("--metrics tcp:0 is reachable beyond this host" in m for m in log_messages) == 1


# ------------------------------------------------------------ --help


@pytest.mark.parametrize(
    ("tap", "required"),
    [
        (client_tap, "Required: --psk-file, and --ca or --server-fingerprint"),
        (server_tap, "Required: --psk-file, and --cert with --key"),
    ],
)
def test_help_names_the_required_options_and_shows_an_example(tap: Any, required: str) -> None:
    text = tap.Options().getUsage(width=100)
    assert required in text
    example = text[text.index("\nExample") :]
    assert f"twistd -n stripe-{tap.Options.role} " in example
    assert "--psk-file" in example


# ------------------------------------------------------------ ListenService


class _Endpoint:
    """An endpoint whose listen() answers with a given Deferred."""

    def __init__(self, result: defer.Deferred[Any]) -> None:
        self.result = result

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return self.result


def _listen_service(result: defer.Deferred[Any], fatal: list[str] | None = None) -> ListenService:
    factory = Factory.forProtocol(Protocol)
    return ListenService(
        "SOCKS listener",
        "127.0.0.1:1080",
        _Endpoint(result),  # type: ignore[arg-type]
        factory,
        None,
        fatal=None if fatal is None else fatal.append,
    )


def _in_use() -> CannotListenError:
    return CannotListenError("127.0.0.1", 1080, OSError(98, "Address already in use"))


def test_a_listener_that_fails_at_once_raises_one_line(log_messages: list[str]) -> None:
    service = _listen_service(defer.fail(_in_use()))
    with pytest.raises(ListenFailed) as raised:
        service.privilegedStartService()
    line = "cannot listen on 127.0.0.1:1080 (SOCKS listener): Address already in use"
    assert raised.value.code == 1
    assert str(raised.value) == line
    assert log_messages == [line]


def test_a_listener_that_fails_later_ends_the_process(log_messages: list[str]) -> None:
    waiting: defer.Deferred[Any] = defer.Deferred()
    fatal: list[str] = []
    service = _listen_service(waiting, fatal)
    service.startService()
    assert fatal == []
    waiting.errback(_in_use())
    line = "cannot listen on 127.0.0.1:1080 (SOCKS listener): Address already in use"
    assert fatal == [line]
    assert log_messages == [line]


def test_stopping_before_the_port_is_up_is_not_a_failure(log_messages: list[str]) -> None:
    fatal: list[str] = []
    service = _listen_service(defer.Deferred(), fatal)
    service.startService()
    service.stopService()
    assert fatal == [] and log_messages == []


# ------------------------------------------------------------ real twistd processes


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def twistd(
    tmp_path: Path, *argv: str, daemon_args: tuple[str, ...] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``twistd -n`` logging to stdout, as the systemd units do (or with ``daemon_args``)."""
    if daemon_args is None:
        daemon_args = ("--nodaemon", "--pidfile=", "--logfile", "-")
    return subprocess.run(
        [str(VENV_BIN / "twistd"), *daemon_args, *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=PROCESS_GUARD,
    )


@pytest.mark.parametrize("what", ["subflow listener", "SOCKS listener", "metrics listener"])
def test_a_taken_port_ends_the_process(
    keys: Keys, tmp_path: Path, taken_port: int, what: str
) -> None:
    address = f"127.0.0.1:{taken_port}"
    common = ["--no-tui", "--no-tls", "--psk-file", keys.psk]
    argv = {
        "subflow listener": ["stripe-server", *common, "--listen", address],
        "SOCKS listener": ["stripe-client", *common, "--listen", address],
        "metrics listener": ["stripe-server", *common, "--listen", "tcp:0", "--metrics", address],
    }[what]
    result = twistd(tmp_path, *argv)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    line = f"cannot listen on {address} ({what}): Address already in use"
    assert sum(line in row for row in output.splitlines()) == 1, output
    assert "Traceback" not in output


@pytest.mark.parametrize("daemon", [False, True])
def test_a_taken_port_is_told_on_the_terminal_when_the_log_is_a_file(
    keys: Keys, tmp_path: Path, taken_port: int, daemon: bool
) -> None:
    """With ``--logfile FILE`` (as behind the dashboard), and in daemon mode,
    where twistd's parent waits for the daemon to report its start."""
    log = tmp_path / "server.log"
    mode = ("--pidfile", str(tmp_path / "twistd.pid")) if daemon else ("--nodaemon",)
    address = f"127.0.0.1:{taken_port}"
    argv = ["stripe-server", "--no-tui", "--no-tls", "--psk-file", keys.psk, "--listen", address]
    result = twistd(tmp_path, *argv, daemon_args=(*mode, "--logfile", str(log)))
    line = f"cannot listen on {address} (subflow listener): Address already in use"
    assert result.returncode == 1
    assert sum(line in row for row in result.stderr.splitlines()) == 1, result.stderr
    assert sum(line in row for row in log.read_text().splitlines()) == 1
    assert "Traceback" not in result.stderr + log.read_text()


def test_a_usage_error_is_one_line_on_stderr(keys: Keys, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.crt")
    result = twistd(
        tmp_path, "stripe-server", "--psk-file", keys.psk, "--cert", missing, "--key", keys.key
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"stripe-server: --cert {missing}: No such file or directory "
        "(see: twistd stripe-server --help)"
    ]


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--server-fingerprint", "AB:CD"], "--server-fingerprint: not a SHA-256"),
        (["--no-tls", "--no-such-option"], "option --no-such-option not recognized"),
        (["--no-tls", "--subflows", "many"], "Parameter type enforcement failed"),
    ],
)
def test_client_usage_errors_put_the_reason_first(
    keys: Keys, tmp_path: Path, argv: list[str], reason: str
) -> None:
    result = twistd(tmp_path, "stripe-client", "--psk-file", keys.psk, *argv)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"stripe-client: {reason}")
    assert "Traceback" not in result.stderr and "Options:" not in result.stdout
