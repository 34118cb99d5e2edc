"""The deployment files in deploy/: systemd units and scale-out behind HAProxy.

The unit tests read the shipped units and their example environment files
and feed the exact command lines to the real option parsers, so a renamed
option or a typo in a unit fails here rather than on a server at boot.

The HAProxy test runs the shipped ``deploy/haproxy/haproxy.cfg`` (only its
listening port, its backend addresses and the host-specific process lines
changed) in front of two real ``twistd stripe-server`` processes, with
in-process clients dialling through it from distinct loopback source
addresses, and checks what the configuration promises: source affinity keeps
all of a client's subflows on one instance, clients spread over instances,
and when an instance dies its clients rebuild their sessions on a live one.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
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
    free_port,
    in_thread,
    sleep,
    socks_echo,
    spawn,
    start_client,
    start_instance,
    start_target,
    wait_listening,
)
from prometheus_client.parser import text_string_to_metric_families

from stripeproxy.cli import client_tap, server_tap

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
# `balance source` with `hash-type consistent` maps a client address to an
# instance by a fixed hash of the address and the servers' ids (1 and 2 here,
# from their order), so the mapping is deterministic: with two instances
# these four addresses land two on each (127.0.0.2 and .4 on the first).
SOURCES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]


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


def haproxy_config(shipped: str, port: int, backends: list[int]) -> str:
    """The shipped configuration, aimed at this test's ports.

    Everything that decides behaviour (mode, balance, hash type, checks,
    timeouts) is kept; only the host-specific process lines (chroot, user,
    group, admin socket: they need root and Debian's layout), the connection
    limits (they need a file-descriptor limit a test host may not grant), the
    bind address and the server list change.  The generated servers keep the
    shipped names' pattern, so their ids (which the consistent hash uses)
    are 1..N in order, as in the shipped file.
    """
    lines = []
    servers_at = None
    for line in shipped.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            lines.append(line)
        elif words[0] in ("chroot", "user", "group") or words[:2] == ["stats", "socket"]:
            continue
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
    assert ["balance", "source"] in settings
    assert ["hash-type", "consistent"] in settings
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


async def placement(instances: list[Instance], clients: list[Client]) -> Placement:
    """Scrape every live instance; list what contradicts "one instance, K subflows each"."""
    views = []
    for instance in instances:
        alive = instance.process.popen.poll() is None
        views.append(await in_thread(scrape, instance.metrics_port) if alive else InstanceView())
    found = Placement([view.sessions for view in views])
    for instance, view in zip(instances, views, strict=True):
        found.problems += view.problems(instance.process.name)
    labels = []
    for source, client in zip(SOURCES, clients, strict=True):
        driver = client.driver
        if driver is None or not driver.established or len(driver.subflows) != K:
            found.problems.append(f"client {source} has no session with {K} subflows")
            continue
        labels.append(driver.label)
        homes = {i: s[driver.label] for i, s in enumerate(found.per_instance) if driver.label in s}
        if len(homes) != 1 or len(next(iter(homes.values()))) != K:
            found.problems.append(f"client {source} session {driver.label}: {homes}")
    strays = {label for sessions in found.per_instance for label in sessions} - set(labels)
    if strays:
        found.problems.append(f"sessions no client holds: {sorted(strays)}")
    return found


async def settled(
    instances: list[Instance], clients: list[Client], timeout: float = 20.0
) -> Placement:
    """Wait until every client has one session, on one instance, with all K subflows.

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


async def echo_through_all(clients: list[Client], target_port: int, size: int) -> None:
    """A concurrent echo through every client; each must come back bit-exact."""
    transfers = [
        in_thread(socks_echo, client.socks_port, target_port, size, seed)
        for seed, client in enumerate(clients)
    ]
    for source, transfer in zip(SOURCES, transfers, strict=True):
        result = await transfer
        assert result.errors == [], source
        assert (result.sent, result.received) == (size, size), source
        assert result.received_sha == result.sent_sha, source


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")
@pytest_twisted.ensureDeferred
async def test_haproxy_source_affinity_and_failover(
    cleanup: Cleanup, keys: Keys, tmp_path: Path
) -> None:
    """Four clients (K=3) through the shipped HAProxy config to two real instances.

    Each client binds its own loopback source address, since `balance
    source` can only spread clients that come from different addresses.
    """
    instances = [
        await start_instance(cleanup, keys, f"stripe-server-{n}", tmp_path, INSTANCE_OPTIONS)
        for n in (1, 2)
    ]
    port = await free_port()
    config = tmp_path / "haproxy.cfg"
    shipped = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    config.write_text(haproxy_config(shipped, port, [i.port for i in instances]))
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

    target = await start_target(cleanup, EchoFactory())
    clients = []
    for source in SOURCES:
        # An endpoint string binds the subflows' source address; with it the
        # server name to check cannot be derived, so it is given (the
        # certificate is pinned by fingerprint anyway).
        server = f"tcp:127.0.0.1:{port}:bindAddress={source}:timeout=10"
        extra = ["--server", server, "--server-name", "localhost", "--retry-max", "1"]
        clients.append(await start_client(cleanup, keys, port, True, K, extra))

    # Affinity and spread.
    found = await settled(instances, clients)
    homes = [found.instance_of(label(client)) for client in clients]
    assert set(homes) == {0, 1}, f"clients not spread over both instances: {homes}"
    await echo_through_all(clients, target.port, 2 * MiB)

    # A client with a wrong key: thanks to the PROXY header its instance sees
    # and delays its own address, not HAProxy's (the re-dials below would all
    # wait otherwise).
    bad_server = f"tcp:127.0.0.1:{port}:bindAddress={BAD_SOURCE}:timeout=10"
    bad_extra = ["--server", bad_server, "--server-name", "localhost", "--retry-max", "1"]
    # After a bad-key REJECT a client waits a minute before it dials again
    # (SPEC.md section 2): two subflows make the two failures in a row at once.
    await start_client(cleanup, keys, port, True, 2, bad_extra, psk=keys.wrong_psk)
    refused = f"subflow {BAD_SOURCE}:\\d+: authentication failed .* 2 in a row from {BAD_SOURCE}"
    await first_of(instances, refused)

    # An instance dies: HAProxy's checks mark it down, its clients' re-dials
    # hash to the live one, which does not know their sessions; those clients
    # start new sessions there.  The other clients keep theirs undisturbed.
    dead = homes[0]
    assert dead is not None
    before = {
        home: {label(c) for c, h in zip(clients, homes, strict=True) if h == home}
        for home in (0, 1)
    }
    instances[dead].process.popen.kill()
    await in_thread(instances[dead].process.popen.wait, 10)
    found = await settled(instances, clients, timeout=30)
    assert found.per_instance[dead] == {}
    after = {label(client) for client in clients}
    assert before[1 - dead] <= after, "a client of the live instance lost its session"
    assert not before[dead] & after, "a session of the dead instance lives on"
    await echo_through_all(clients, target.port, 2 * MiB)
