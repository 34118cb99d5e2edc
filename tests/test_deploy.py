"""The deployment files in deploy/: systemd units and scale-out behind HAProxy.

The unit tests read the shipped units and their example environment files
and feed the exact command lines to the real option parsers, so a renamed
option or a typo in a unit fails here rather than on a server at boot.

The HAProxy tests run the shipped ``deploy/haproxy/haproxy.cfg`` (only its
listening port, its backend addresses and the host-specific process lines
changed) in front of two real ``twistd stripe-server`` processes, with
in-process clients dialling through it from loopback source addresses, and
check what the configuration promises: the session routing token in the SNI
keeps all of a session's subflows on one instance, even when they come from
several source addresses and when they re-dial; sessions spread over
instances; and when an instance dies its clients rebuild their sessions on a
live one.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_twisted
from helpers import (
    REPO,
    VENV_BIN,
    Cleanup,
    Client,
    EchoFactory,
    Instance,
    Keys,
    MiB,
    Target,
    free_port,
    in_thread,
    sleep,
    socks_echo,
    spawn,
    start_client,
    start_instance,
    start_target,
    wait_for,
    wait_listening,
)
from prometheus_client.parser import text_string_to_metric_families

from stripeproxy.cli import client_tap, server_tap
from stripeproxy.core import handshake, routing

DEPLOY = REPO / "deploy"
SYSTEMD = DEPLOY / "systemd"
# Debian installs it in /usr/sbin, which a non-root PATH may lack.
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

UNITS = {
    "stripe-server.service": ("stripe-server", "stripe-server.env.example"),
    "stripe-client.service": ("stripe-client", "stripe-client.env.example"),
    "stripe-server@.service": ("stripe-server", "stripe-server.env.example"),
}

# Subflows per client in the HAProxy test.
K = 3
# One loopback source address per client of the four-client test.
SOURCES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
# `balance hash` with `hash-type consistent` maps a routing token to an
# instance by a fixed hash of the token and the servers' ids (1 and 2 here,
# from their order), so the mapping is deterministic: the tokens of these
# session ids land two on each instance (16 x 02 and 16 x 09 on the first).
# The tests hand them out in place of random ones (fixed_session_ids).
SPREAD_SESSION_IDS = [bytes([n]) * 16 for n in (1, 2, 3, 9)]
# And these all on the first instance.
FIRST_INSTANCE_SESSION_IDS = [bytes([n]) * 16 for n in (2, 9)]


# ------------------------------------------------------------ systemd units


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, in order, continuation lines joined.

    Sections are merged: the keys the tests look at are not ambiguous.
    """
    settings: dict[str, list[str]] = {}
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith(("#", ";", "["))):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        key, _, value = (logical + line).partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
        logical = ""
    return settings


def env_file(path: Path) -> dict[str, str]:
    """The assignments of a systemd EnvironmentFile (double-quoted values)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        values[key] = value.strip('"')
    return values


def expand_exec(command: str, env: dict[str, str], credentials: Path) -> list[str]:
    """ExecStart= as systemd runs it: ``$VAR`` splits into words, ``${VAR}`` does not."""
    words = []
    for word in command.split():
        if re.fullmatch(r"\$[A-Z_]+", word):
            words += env[word[1:]].split()
        else:
            word = word.replace("${CREDENTIALS_DIRECTORY}", str(credentials))
            words.append(word.replace("%i", "8451"))
    return words


@pytest.mark.parametrize("unit", list(UNITS))
def test_unit_runs_twistd_in_the_foreground_hardened(unit: str) -> None:
    """Foreground twistd logging to the journal, hardened, restarted on failure."""
    settings = unit_settings(SYSTEMD / unit)
    single = {key: values[-1] for key, values in settings.items()}
    expected = {
        "Type": "simple",
        "Restart": "on-failure",
        "RestartSec": "2",
        "RestartPreventExitStatus": "2",  # a usage error: restarting cannot fix it
        "LimitNOFILE": "65536",
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "no",  # TLS callbacks need W+X memory
    }
    assert {key: single.get(key) for key in expected} == expected
    # Longer than the server's drain on SIGTERM (--drain-timeout, 10 s).
    assert int(single["TimeoutStopSec"]) > 10
    (command,) = settings["ExecStart"]
    words = command.split()
    tap = UNITS[unit][0]
    assert words[0] == "/opt/stripeproxy/bin/twistd"
    # Foreground, no pid file, log to stdout (the journal), never the dashboard.
    assert words[1 : words.index(tap)] == ["--nodaemon", "--pidfile=", "--logfile", "-"]
    assert words[words.index(tap) + 1] == "--no-tui"
    # Every credential the command line reads is loaded from /etc/stripeproxy.
    loaded = dict(value.split(":", 1) for value in settings["LoadCredential"])
    read = set(re.findall(r"\$\{CREDENTIALS_DIRECTORY\}/([\w.]+)", command))
    assert read == set(loaded)
    assert all(path == f"/etc/stripeproxy/{name}" for name, path in loaded.items())


@pytest.mark.parametrize("unit", list(UNITS))
def test_unit_command_line_parses(unit: str, keys: Keys, tmp_path: Path) -> None:
    """The command a unit runs, with its example environment, is accepted by the tap."""
    tap, example = UNITS[unit]
    env = env_file(SYSTEMD / example)
    (command,) = unit_settings(SYSTEMD / unit)["ExecStart"]
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name, source in [("server.crt", keys.cert), ("server.key", keys.key)]:
        shutil.copy(source, credentials / name)
    shutil.copy(keys.psk, credentials / "psk.key")
    words = expand_exec(command, env, credentials)
    argv = words[words.index(tap) + 1 :]
    options = server_tap.Options() if tap == "stripe-server" else client_tap.Options()
    options.parseOptions(argv)
    assert options["tui"] is False
    if unit == "stripe-server@.service":
        assert options["listen"] == "127.0.0.1:8451"  # the instance name wins
        assert options["proxy-protocol"]  # HAProxy sends send-proxy-v2 headers
    elif tap == "stripe-server":
        assert options["listen"] == "0.0.0.0:8443"


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser accepts every line (unknown keys and bad values warn).

    The units name /opt/stripeproxy/bin/twistd, which ``verify`` requires to
    exist; the copies point at this venv's twistd instead.
    """
    paths = []
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text()
        name = unit.replace("@.", "@8451.")
        copy = tmp_path / name
        copy.write_text(text.replace("/opt/stripeproxy/bin/twistd", str(VENV_BIN / "twistd")))
        paths.append(str(copy))
    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", *paths],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# Which unit reads which variable of the example environment files.
UNIT_OF_VARIABLE = {
    "STRIPE_SERVER_ARGS": "stripe-server.service",
    "STRIPE_SERVER_INSTANCE_ARGS": "stripe-server@.service",
    "STRIPE_CLIENT_ARGS": "stripe-client.service",
}


def test_every_example_alternative_parses(keys: Keys, tmp_path: Path) -> None:
    """The commented-out alternatives in the env examples are advice an
    operator copies: each one, in its unit's command line, is accepted too."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name, source in [("server.crt", keys.cert), ("server.key", keys.key)]:
        shutil.copy(source, credentials / name)
    shutil.copy(keys.psk, credentials / "psk.key")
    shutil.copy(keys.cert, credentials / "ca.pem")  # self-signed: its own CA
    seen = []
    for example in ("stripe-server.env.example", "stripe-client.env.example"):
        for line in (SYSTEMD / example).read_text().splitlines():
            found = re.fullmatch(r'#?(STRIPE_[A-Z_]+)="(.*)"', line.strip())
            if found is None:
                continue
            variable, value = found.groups()
            assert shlex.split(value) == value.split(), f"{example}: {line}"
            unit = UNIT_OF_VARIABLE[variable]
            (command,) = unit_settings(SYSTEMD / unit)["ExecStart"]
            value = value.replace("/etc/stripeproxy/", f"{credentials}/")
            words = expand_exec(command, {variable: value}, credentials)
            tap = UNITS[unit][0]
            options = server_tap.Options() if tap == "stripe-server" else client_tap.Options()
            options.parseOptions(words[words.index(tap) + 1 :])
            seen.append(variable)
    # Each file has its active line and at least one alternative.
    assert sorted(set(seen)) == sorted(UNIT_OF_VARIABLE)
    assert len(seen) > len(UNIT_OF_VARIABLE)


def test_env_examples_are_shell_free() -> None:
    """systemd does not run a shell: values must need no quoting beyond the outer quotes."""
    for example in ("stripe-server.env.example", "stripe-client.env.example"):
        for key, value in env_file(SYSTEMD / example).items():
            assert re.fullmatch(r"STRIPE_[A-Z_]+", key), key
            assert shlex.split(value) == value.split(), f"{example}: {key}"


# ------------------------------------------------ kernel: sysctl and modules


def sysctl_settings(path: Path) -> dict[str, str]:
    """``key = value`` lines of a sysctl.d file, as systemd-sysctl reads them."""
    values = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key = value: {raw!r}"
        values[key.strip()] = value.strip()
    return values


def test_sysctl_file_allows_bbr_for_the_unprivileged_units() -> None:
    """--congestion auto wants BBR; the units run without CAP_NET_ADMIN, so the
    sysctl file must list it as allowed, and keep the usual algorithms."""
    settings = sysctl_settings(DEPLOY / "sysctl" / "90-stripeproxy.conf")
    assert settings["net.ipv4.tcp_slow_start_after_idle"] == "0"
    allowed = settings["net.ipv4.tcp_allowed_congestion_control"].split()
    assert {"bbr", "cubic", "reno"} <= set(allowed), allowed
    # The host default is the administrator's: only allowed, never imposed.
    assert "net.ipv4.tcp_congestion_control" not in settings
    # fq pacing is explained, and left to the administrator.
    assert "net.core.default_qdisc" not in settings
    assert (
        "# net.core.default_qdisc = fq" in (DEPLOY / "sysctl" / "90-stripeproxy.conf").read_text()
    )
    for unit in ("stripe-server.service", "stripe-client.service"):
        assert unit_settings(SYSTEMD / unit)["CapabilityBoundingSet"] == [""], unit


def test_modules_load_file_loads_bbr() -> None:
    """modules-load.d: one module name a line, '#' and ';' start comments."""
    path = DEPLOY / "modules-load.d" / "stripeproxy.conf"
    modules = [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.strip().startswith(("#", ";"))
    ]
    assert modules == ["tcp_bbr"]


# ------------------------------------------------------- scale-out: HAProxy


def haproxy_config(shipped: str, port: int, backends: list[int], admin: str) -> str:
    """The shipped configuration, aimed at this test's ports.

    Everything that decides behaviour (mode, balance, hash type, stick
    table, checks, timeouts) is kept; only the host-specific process lines
    (chroot, user, group: they need root and Debian's layout; the admin
    socket moves to ``admin``), the connection limits (they need a
    file-descriptor limit a test host may not grant), the bind address and
    the server list change.  The generated servers keep the
    shipped names' pattern, so their ids (which the consistent hash uses)
    are 1..N in order, as in the shipped file.
    """
    lines = []
    servers_at = None
    for line in shipped.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            lines.append(line)
        elif words[0] in ("chroot", "user", "group"):
            continue
        elif words[:2] == ["stats", "socket"]:
            lines.append(f"    stats socket {admin} mode 600 level admin")
        elif words[0] == "maxconn":
            lines.append("    maxconn 1000")
        elif words[0] == "bind":
            assert words[1] == ":8443", "the shipped frontend listens on :8443"
            lines.append(f"    bind 127.0.0.1:{port}")
        elif words[0] == "server":
            servers_at = len(lines) if servers_at is None else servers_at
        else:
            lines.append(line)
    assert servers_at is not None, "the shipped backend lists servers"
    generated = [f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(backends, 1)]
    lines[servers_at:servers_at] = generated
    return "\n".join(lines) + "\n"


def test_shipped_haproxy_config_settings() -> None:
    """What the deployment relies on, stated in the shipped file."""
    text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    settings = [line.split() for line in text.splitlines() if line.strip()[:1] not in ("", "#")]
    assert ["mode", "tcp"] in settings
    assert ["balance", "hash", "var(sess.route)"] in settings
    assert ["hash-type", "consistent"] in settings
    # The stick table keys on the same value the hash does.
    (table,) = [words for words in settings if words[0] == "stick-table"]
    assert table[:5] == ["stick-table", "type", "string", "len", "64"], table
    assert ["stick", "on", "var(sess.route)"] in settings
    (bind,) = [words for words in settings if words[0] == "bind"]
    assert "ssl" not in bind, "TLS passes through to the stripe servers"
    servers = [words for words in settings if words[0] == "server"]
    assert [words[2] for words in servers] == [f"127.0.0.1:{8450 + i}" for i in range(1, 5)]
    default_server = next(words for words in settings if words[0] == "default-server")
    assert "check" in default_server
    assert "send-proxy-v2" in default_server  # the instances run --proxy-protocol

    def seconds(name: str) -> float:
        """A ``timeout NAME`` value in seconds (HAProxy's default unit is ms)."""
        (value,) = [words[2] for words in settings if words[:2] == ["timeout", name]]
        match = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
        assert match is not None, f"timeout {name} {value}"
        scale = {"ms": 0.001, "s": 1, None: 0.001, "m": 60, "h": 3600}[match[2]]
        return int(match[1]) * scale

    # Idle subflows only carry heartbeats (every 5 s): HAProxy must not cut them.
    for name in ("client", "server", "tunnel"):
        assert seconds(name) >= 120, f"timeout {name}"
    assert seconds("connect") == 5


def test_shipped_haproxy_config_routes_on_the_token() -> None:
    """The frontend waits for the ClientHello, and routes on the SNI only when its
    first label is a routing token; everything else falls back to the source."""
    text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    rules = [
        " ".join(line.split()) for line in text.splitlines() if line.split()[:1] == ["tcp-request"]
    ]
    inspect, fallback, token_rule, accept = rules
    assert inspect == "tcp-request inspect-delay 5s"
    assert fallback == "tcp-request content set-var(sess.route) src"
    assert accept == "tcp-request content accept if { req.ssl_hello_type 1 }"
    match = re.fullmatch(
        r"tcp-request content set-var\(sess\.route\) req\.ssl_sni "
        r"if \{ req\.ssl_sni -m reg (\S+) \}",
        token_rule,
    )
    assert match is not None, token_rule
    # HAProxy's PCRE and Python's re agree on this pattern: test it on the
    # names the client sends, and on names it does not.
    pattern = re.compile(match[1])
    for session_id in (bytes(16), b"\xff" * 16, bytes(range(16))):
        for suffix in ("proxy.example.net", None):
            assert pattern.search(routing.server_name(session_id, suffix))
    for other in ("proxy.example.net", "localhost", "abcdefghijklmnop", "ABCDEFGHIJKLMNOP.x"):
        assert not pattern.search(other), other


@dataclass
class InstanceView:
    """One instance's live sessions and their subflow ids, as its metrics report them."""

    sessions: dict[str, set[str]] = field(default_factory=dict)
    session_gauge: float = 0.0
    subflow_gauge: float = 0.0

    def problems(self, name: str) -> list[str]:
        """What keeps this view from being a steady state.

        The gauges count every session, the per-subflow series only sessions
        with subflows: a difference is a session without any (one in its
        grace period, or a sample taken mid-change).
        """
        subflows = sum(len(ids) for ids in self.sessions.values())
        if (self.session_gauge, self.subflow_gauge) == (len(self.sessions), subflows):
            return []
        return [
            f"{name}: {self.session_gauge:g} sessions and {self.subflow_gauge:g} subflows, "
            f"but {len(self.sessions)} sessions with {subflows} subflows between them"
        ]


def scrape(port: int) -> InstanceView:
    """Read one instance's Prometheus endpoint; blocking (run it in a thread)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    view = InstanceView()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "stripeproxy_subflow_bytes_total":
                ids = view.sessions.setdefault(sample.labels["session"], set())
                ids.add(sample.labels["subflow"])
            elif sample.name == "stripeproxy_sessions":
                view.session_gauge = sample.value
            elif sample.name == "stripeproxy_subflows":
                view.subflow_gauge = sample.value
    return view


@dataclass
class Placement:
    """Where each client's session lives, and what contradicts the expected layout."""

    per_instance: list[dict[str, set[str]]]
    problems: list[str] = field(default_factory=list)

    def instance_of(self, label: str) -> int | None:
        homes = [i for i, sessions in enumerate(self.per_instance) if label in sessions]
        return homes[0] if len(homes) == 1 else None


async def placement(instances: list[Instance], clients: dict[str, Client]) -> Placement:
    """Scrape every live instance; list what contradicts "one instance, K subflows each"."""
    views = []
    for instance in instances:
        alive = instance.process.popen.poll() is None
        views.append(await in_thread(scrape, instance.metrics_port) if alive else InstanceView())
    found = Placement([view.sessions for view in views])
    for instance, view in zip(instances, views, strict=True):
        found.problems += view.problems(instance.process.name)
    labels = []
    for name, client in clients.items():
        driver = client.driver
        if driver is None or not driver.established or len(driver.subflows) != client.k:
            found.problems.append(f"client {name} has no session with {client.k} subflows")
            continue
        labels.append(driver.label)
        homes = {i: s[driver.label] for i, s in enumerate(found.per_instance) if driver.label in s}
        if len(homes) != 1 or len(next(iter(homes.values()))) != client.k:
            found.problems.append(f"client {name} session {driver.label}: {homes}")
    strays = {label for sessions in found.per_instance for label in sessions} - set(labels)
    if strays:
        found.problems.append(f"sessions no client holds: {sorted(strays)}")
    return found


async def settled(
    instances: list[Instance], clients: dict[str, Client], timeout: float = 20.0
) -> Placement:
    """Wait until every client has one session, on one instance, with all its subflows.

    Metrics are sampled every 500 ms, so a fresh change shows up a little late.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = await placement(instances, clients)
        if not found.problems:
            return found
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {i.process.name}:\n{i.process.output()}" for i in instances)
            raise AssertionError("\n".join(found.problems) + "\n" + logs)
        await sleep(0.2)


# Instances behind HAProxy, as stripe-server@.service runs them; a low login
# failure limit so that the test sees it hit.
INSTANCE_OPTIONS = ["--proxy-protocol", "--auth-failures", "2"]
BAD_SOURCE = "127.0.0.9"


async def first_of(instances: list[Instance], pattern: str, timeout: float = 20.0) -> None:
    """Wait until some instance's log matches ``pattern``."""
    deadline = time.monotonic() + timeout
    while not any(re.search(pattern, i.process.output()) for i in instances):
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {i.process.name}:\n{i.process.output()}" for i in instances)
            raise AssertionError(f"no instance logged {pattern!r}\n{logs}")
        await sleep(0.1)


def label(client: Client) -> str:
    """The client's session label: the same string the server's metrics use."""
    assert client.driver is not None, "the client has no session"
    return client.driver.label


async def echo_through_all(clients: dict[str, Client], target_port: int, size: int) -> None:
    """A concurrent echo through every client; each must come back bit-exact."""
    transfers = {
        name: in_thread(socks_echo, client.socks_port, target_port, size, seed)
        for seed, (name, client) in enumerate(clients.items())
    }
    for name, transfer in transfers.items():
        result = await transfer
        assert result.errors == [], name
        assert (result.sent, result.received) == (size, size), name
        assert result.received_sha == result.sent_sha, name


def fixed_session_ids(monkeypatch: pytest.MonkeyPatch, ids: list[bytes]) -> None:
    """The clients' next sessions take these ids (then random ones again), so
    that the instance their routing tokens hash to is known."""
    queue = list(ids)
    random_id = handshake.new_session_id
    monkeypatch.setattr(handshake, "new_session_id", lambda: queue.pop(0) if queue else random_id())


@dataclass
class Balancer:
    """HAProxy as the tests run it: its port and its admin socket."""

    port: int
    admin: str

    def status(self, server: str) -> str:
        """A backend server's state as HAProxy sees it (``UP``, ``DOWN``, ``UP 1/2``...);
        blocking (run it in a thread)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(self.admin)
            sock.sendall(b"show stat\n")
            text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
        header, *rows = csv.reader(text.removeprefix("# ").splitlines())
        for row in rows:
            if row[:2] == ["stripe_servers", server]:
                return row[header.index("status")]
        raise AssertionError(f"HAProxy does not list {server}:\n{text}")


async def start_haproxy(cleanup: Cleanup, instances: list[Instance], tmp_path: Path) -> Balancer:
    """The shipped configuration in front of ``instances``, checked, then run."""
    port = await free_port()
    config = tmp_path / "haproxy.cfg"
    shipped = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    # A unix socket path must be short (108 bytes): not below tmp_path.
    admin = tempfile.mkdtemp(prefix="stripe-haproxy-")
    cleanup.add(lambda: shutil.rmtree(admin, ignore_errors=True), "remove the admin socket")
    balancer = Balancer(port, os.path.join(admin, "admin.sock"))
    config.write_text(haproxy_config(shipped, port, [i.port for i in instances], balancer.admin))
    assert HAPROXY is not None
    checked = await in_thread(
        subprocess.run,
        [HAPROXY, "-c", "-f", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    haproxy = spawn(cleanup, "haproxy", [HAPROXY, "-f", str(config), "-db"], tmp_path)
    await wait_listening(haproxy, port)
    return balancer


async def behind_haproxy(
    cleanup: Cleanup, keys: Keys, tmp_path: Path
) -> tuple[list[Instance], Balancer, Target]:
    """Two real instances behind the shipped HAProxy config, and an echo target."""
    instances = [
        await start_instance(cleanup, keys, f"stripe-server-{n}", tmp_path, INSTANCE_OPTIONS)
        for n in (1, 2)
    ]
    balancer = await start_haproxy(cleanup, instances, tmp_path)
    return instances, balancer, await start_target(cleanup, EchoFactory())


def through(port: int, source: str) -> list[str]:
    """Client options that dial HAProxy from ``source``.

    An endpoint string binds the subflows' source address; with it the
    server name to check cannot be derived, so it is given (the certificate
    is pinned by fingerprint anyway).
    """
    server = f"tcp:127.0.0.1:{port}:bindAddress={source}:timeout=10"
    return ["--server", server, "--server-name", "localhost", "--retry-max", "1"]


async def kill(instance: Instance) -> None:
    instance.process.popen.kill()
    await in_thread(instance.process.popen.wait, 10)


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")
@pytest_twisted.ensureDeferred
async def test_haproxy_session_affinity_and_failover(
    cleanup: Cleanup, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four clients (K=3) through the shipped HAProxy config to two real instances.

    Each client binds its own loopback source address, so that the PROXY
    header's per-address accounting is seen too.
    """
    instances, balancer, target = await behind_haproxy(cleanup, keys, tmp_path)
    port = balancer.port
    fixed_session_ids(monkeypatch, SPREAD_SESSION_IDS)
    clients = {
        source: await start_client(cleanup, keys, port, True, K, through(port, source))
        for source in SOURCES
    }

    # Affinity and spread.
    found = await settled(instances, clients)
    homes = [found.instance_of(label(client)) for client in clients.values()]
    assert set(homes) == {0, 1}, f"clients not spread over both instances: {homes}"
    await echo_through_all(clients, target.port, 2 * MiB)

    # A client with a wrong key: thanks to the PROXY header its instance sees
    # and delays its own address, not HAProxy's (the re-dials below would all
    # wait otherwise).
    # After a bad-key REJECT a client waits a minute before it dials again
    # (SPEC.md section 2): two subflows make the two failures in a row at once.
    bad_extra = through(port, BAD_SOURCE)
    await start_client(cleanup, keys, port, True, 2, bad_extra, psk=keys.wrong_psk)
    refused = f"subflow {BAD_SOURCE}:\\d+: authentication failed .* 2 in a row from {BAD_SOURCE}"
    await first_of(instances, refused)

    # An instance dies: HAProxy's checks mark it down, its clients' re-dials
    # hash to the live one, which does not know their sessions; those clients
    # start new sessions there.  The other clients keep theirs undisturbed.
    dead = homes[0]
    assert dead is not None
    before = {
        home: {label(c) for c, h in zip(clients.values(), homes, strict=True) if h == home}
        for home in (0, 1)
    }
    await kill(instances[dead])
    found = await settled(instances, clients, timeout=30)
    assert found.per_instance[dead] == {}
    after = {label(client) for client in clients.values()}
    assert before[1 - dead] <= after, "a client of the live instance lost its session"
    assert not before[dead] & after, "a session of the dead instance lives on"
    await echo_through_all(clients, target.port, 2 * MiB)


# The two uplinks of the multi-path client, as two loopback source addresses.
UPLINKS = ["127.0.0.2", "127.0.0.3"]
MULTIPATH_K = 4


def sources_of(client: Client) -> set[str]:
    """The local addresses of the client's current subflows."""
    driver = client.driver
    assert driver is not None
    return {subflow.transport.getHost().host for subflow in driver.subflows.values()}


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")
@pytest_twisted.ensureDeferred
async def test_haproxy_keeps_a_multipath_session_on_one_instance(
    cleanup: Cleanup, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One client whose subflows leave from two addresses, through the shipped
    HAProxy config to two real instances: the routing token in the SNI keeps the
    whole session on one instance, re-dials go back there, when that instance
    dies the client's next session lives on the other one, and stays there
    when the dead instance comes back."""
    instances, balancer, target = await behind_haproxy(cleanup, keys, tmp_path)
    # Its first session's token hashes to the first instance, and so does
    # its second's (see the last step).
    fixed_session_ids(monkeypatch, FIRST_INSTANCE_SESSION_IDS)
    extra = ["--server", f"127.0.0.1:{balancer.port}", "--server-name", "localhost"]
    extra += ["--retry-max", "1"]
    for name, source in zip("ab", UPLINKS, strict=True):
        extra += ["--path", f"{name}={source}:{MULTIPATH_K // 2}"]
    client = await start_client(cleanup, keys, balancer.port, True, MULTIPATH_K, extra)
    clients = {"multipath": client}

    found = await settled(instances, clients)
    session = label(client)
    assert found.instance_of(session) == 0
    assert sources_of(client) == set(UPLINKS), "the subflows do not use both uplinks"
    await echo_through_all(clients, target.port, 2 * MiB)

    # Every subflow drops at once (both uplinks blink): the session waits out
    # its grace period, and the re-dials, from both addresses again, carry
    # its token back to the same instance.
    await redial_all(client)
    found = await settled(instances, clients)
    assert (label(client), found.instance_of(session)) == (session, 0)
    assert sources_of(client) == set(UPLINKS)
    await echo_through_all(clients, target.port, 2 * MiB)

    # Its instance dies: the client's re-dials reach the other one, which
    # does not know the session; the client starts a new one there, with a
    # new token, and a new CONNECT carries data again.
    await kill(instances[0])
    found = await settled(instances, clients, timeout=30)
    moved = label(client)
    assert moved != session
    assert found.instance_of(moved) == 1
    assert sources_of(client) == set(UPLINKS)
    await echo_through_all(clients, target.port, 2 * MiB)

    # The instance comes back on its port.  The new session's token hashes
    # to it too, but HAProxy's stick table remembers where the session
    # lives: re-dials stay there and the session keeps going.
    options = [*INSTANCE_OPTIONS, "--listen", f"tcp:{instances[0].port}:interface=127.0.0.1"]
    instances[0] = await start_instance(cleanup, keys, "stripe-server-1-again", tmp_path, options)

    async def up() -> bool:
        return await in_thread(balancer.status, "s1") == "UP"

    deadline = time.monotonic() + 20
    while not await up():
        assert time.monotonic() < deadline, "HAProxy does not see the instance come back"
        await sleep(0.2)
    await redial_all(client)
    found = await settled(instances, clients)
    assert (label(client), found.instance_of(moved)) == (moved, 1)
    await echo_through_all(clients, target.port, 2 * MiB)


async def redial_all(client: Client) -> None:
    """Cut every subflow of the client's session at once; it re-dials them."""
    driver = client.driver
    assert driver is not None
    for subflow in list(driver.subflows.values()):
        subflow.transport.abortConnection()
    await wait_for(lambda: driver.subflow_count == 0, "the subflows to drop", 10)
