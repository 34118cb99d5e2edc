"""Which congestion control the subflows use: the pure choice, the /proc
probe (real where the kernel allows, injected where it does not), and what
each subflow reports (issue 11, item 1)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from stripeproxy.core.congestion import AUTO, Choice, choose
from stripeproxy.net import congestion
from stripeproxy.net.congestion import KernelCC, decide, in_use, read_kernel, resolve
from stripeproxy.net.subflow import tune_socket

LOADED = {"reno", "cubic", "bbr"}
NO_BBR = {"reno", "cubic"}
ALLOWED = {"reno", "cubic", "bbr"}
NOT_ALLOWED = {"reno", "cubic"}

# requested, available, allowed, privileged, default -> algorithm, apply, reason
CASES = [
    # auto, BBR loaded and allowed: the default first, BBR where loss is random.
    (
        AUTO,
        LOADED,
        ALLOWED,
        False,
        "cubic",
        "cubic",
        False,
        "cubic for subflows (system default), bbr for each one that shows random loss "
        "(bbr available, allowed)",
    ),
    # auto, BBR loaded but not allowed, unprivileged: the system default, and why.
    (
        AUTO,
        LOADED,
        NOT_ALLOWED,
        False,
        "cubic",
        "cubic",
        False,
        "cubic (system default): bbr is not available to this process (not allowed: add it to "
        "net.ipv4.tcp_allowed_congestion_control, or run with CAP_NET_ADMIN)",
    ),
    # auto, loaded, not listed as allowed but the process holds CAP_NET_ADMIN.
    (
        AUTO,
        LOADED,
        NOT_ALLOWED,
        True,
        "cubic",
        "cubic",
        False,
        "cubic for subflows (system default), bbr for each one that shows random loss "
        "(bbr available, privileged)",
    ),
    # auto, module not loaded: privilege does not help.
    (
        AUTO,
        NO_BBR,
        NOT_ALLOWED,
        True,
        "cubic",
        "cubic",
        False,
        "cubic (system default): bbr is not available to this process "
        "(not loaded: modprobe tcp_bbr)",
    ),
    # auto where BBR already is the default: nothing to set.
    (AUTO, LOADED, ALLOWED, False, "bbr", "bbr", False, "bbr for subflows (system default)"),
    # Explicit names.
    (
        "cubic",
        LOADED,
        ALLOWED,
        False,
        "bbr",
        "cubic",
        True,
        "cubic for subflows (requested; available, allowed)",
    ),
    (
        "cubic",
        LOADED,
        ALLOWED,
        False,
        "cubic",
        "cubic",
        False,
        "cubic for subflows (requested; system default)",
    ),
    (
        "BBR",
        LOADED,
        NOT_ALLOWED,
        True,
        "cubic",
        "bbr",
        True,
        "bbr for subflows (requested; available, privileged)",
    ),
    (
        "bbr",
        LOADED,
        NOT_ALLOWED,
        False,
        "cubic",
        "cubic",
        False,
        "cubic (system default): cannot use --congestion bbr: bbr is not available to this "
        "process (not allowed: add it to net.ipv4.tcp_allowed_congestion_control, or run with "
        "CAP_NET_ADMIN)",
    ),
    (
        "vegas",
        LOADED,
        ALLOWED,
        True,
        "cubic",
        "cubic",
        False,
        "cubic (system default): cannot use --congestion vegas: vegas is not available to "
        "this process (not loaded: modprobe tcp_vegas)",
    ),
]


@pytest.mark.parametrize(
    ("requested", "available", "allowed", "privileged", "default", "algorithm", "apply", "reason"),
    CASES,
)
def test_choose(
    requested: str,
    available: set[str],
    allowed: set[str],
    privileged: bool,
    default: str,
    algorithm: str,
    apply: bool,
    reason: str,
) -> None:
    choice = choose(requested, available, allowed, privileged, default)
    # Only auto moves subflows, and only when it could set BBR.
    upgrade = "bbr" if "random loss" in reason else None
    assert choice == Choice(algorithm, apply, reason, upgrade)
    assert choice.log_line == f"congestion control: {reason}"


def _facts(available: set[str], allowed: set[str], privileged: bool = False) -> KernelCC:
    return KernelCC(frozenset(available), frozenset(allowed), privileged, "cubic")


def test_decide_falls_back_when_the_probe_socket_refuses() -> None:
    """The lists say yes, the kernel says no (a namespace, a security module)."""
    tried: list[str] = []

    def refuse(name: str) -> str:
        tried.append(name)
        return "Operation not permitted"

    choice = decide(AUTO, _facts(LOADED, ALLOWED), refuse)
    assert tried == ["bbr"]
    assert choice == Choice(
        "cubic",
        False,
        "cubic (system default): bbr could not be set (Operation not permitted)",
    )


def test_decide_does_not_probe_what_it_will_not_set() -> None:
    def fail(name: str) -> str:
        raise AssertionError(name)

    assert decide(AUTO, _facts(NO_BBR, NOT_ALLOWED), fail).algorithm == "cubic"
    assert decide(AUTO, _facts(LOADED, ALLOWED), lambda name: "").upgrade == "bbr"
    assert decide("cubic", _facts(LOADED, ALLOWED), fail).apply is False


def _capture() -> tuple[list[str], object]:
    lines: list[str] = []

    def observer(event: LogEvent) -> None:
        if event.get("log_namespace") == congestion.__name__:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    return lines, observer


@pytest.mark.parametrize(
    ("requested", "available", "expected", "line"),
    [
        (
            AUTO,
            LOADED,
            Choice("cubic", False, "", "bbr"),
            "congestion control: cubic for subflows (system default), bbr for each one",
        ),
        (
            AUTO,
            NO_BBR,
            Choice("cubic", False, ""),
            "congestion control: cubic (system default): bbr is not available to this "
            "process (not loaded: modprobe tcp_bbr)",
        ),
        ("reno", LOADED, Choice("reno", True, ""), "congestion control: reno for subflows "),
    ],
)
def test_resolve_logs_one_line(
    requested: str, available: set[str], expected: Choice, line: str
) -> None:
    lines, observer = _capture()
    try:
        got = resolve(requested, lambda: _facts(available, ALLOWED), lambda name: "")
    finally:
        globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]
    assert got is not None
    assert (got.algorithm, got.apply, got.upgrade) == (
        expected.algorithm,
        expected.apply,
        expected.upgrade,
    )
    assert len(lines) == 1 and lines[0].startswith(line), lines


def test_resolve_without_a_request_keeps_the_kernel_default_silently() -> None:
    lines, observer = _capture()

    def fail() -> KernelCC:
        raise AssertionError("read")

    try:
        assert resolve(None, fail) is None
        assert resolve("", fail) is None
    finally:
        globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]
    assert lines == []


def test_read_kernel_from_injected_files(tmp_path: Path) -> None:
    (tmp_path / "tcp_available_congestion_control").write_text("reno cubic bbr\n")
    (tmp_path / "tcp_allowed_congestion_control").write_text("reno cubic\n")
    (tmp_path / "tcp_congestion_control").write_text("cubic\n")
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")  # bit 12: CAP_NET_ADMIN
    facts = read_kernel(tmp_path, status)
    assert facts == KernelCC(
        frozenset({"reno", "cubic", "bbr"}), frozenset({"reno", "cubic"}), True, "cubic"
    )
    status.write_text("CapEff:\t0000000000000000\n")
    assert not read_kernel(tmp_path, status).privileged
    # Not Linux: nothing is available, the default has no name.
    empty = read_kernel(tmp_path / "missing", status)
    assert empty == KernelCC(frozenset(), frozenset(), False, "default")
    assert choose(AUTO, empty.available, empty.allowed, False, empty.default) == Choice(
        "default",
        False,
        "default (system default): bbr is not available to this process "
        "(the system lists no algorithms)",
    )


# ---------------------------------------------------------------- real sockets

_PROC = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")
_REAL = read_kernel()


def _settable(name: str) -> bool:
    return name in _REAL.available and (name in _REAL.allowed or _REAL.privileged)


@pytest.mark.skipif(not _PROC.exists(), reason="needs Linux /proc")
def test_real_choice_matches_what_a_socket_accepts() -> None:
    """On this kernel: what ``decide`` says is what a new socket gets."""
    choice = decide(AUTO, _REAL)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if choice.apply:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, choice.algorithm.encode())
        assert in_use(sock) == choice.algorithm == _REAL.default
        if choice.upgrade is not None:
            assert congestion.set_algorithm(sock, choice.upgrade) == ""
            assert in_use(sock) == choice.upgrade == "bbr"
    can_move = _settable("bbr") and _REAL.default != "bbr"
    assert (choice.upgrade == "bbr") == can_move


class _Transport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def getHandle(self) -> socket.socket:
        return self.sock


@pytest.mark.skipif(not _PROC.exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("name", ["reno", "cubic", "bbr"])
def test_tune_socket_reports_the_algorithm_in_use(name: str) -> None:
    """A subflow reports what its socket uses, whether or not ``name`` took."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        got = tune_socket(_Transport(sock), name)
        assert got == in_use(sock)
        if _settable(name):
            assert got == name
        else:
            assert got == _REAL.default


def test_tune_socket_without_a_tcp_socket_reports_nothing() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        assert tune_socket(_Transport(sock), "bbr") is None
    assert tune_socket(None, "bbr") is None


def _in_unprivileged_child(requested: str) -> tuple[str, bool, str, str | None]:
    """``decide`` and a real socket's algorithm, in a forked child that has
    dropped root (uid nobody, so no CAP_NET_ADMIN)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            choice = decide(requested, read_kernel())
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                if choice.apply:
                    sock.setsockopt(
                        socket.IPPROTO_TCP, socket.TCP_CONGESTION, choice.algorithm.encode()
                    )
                used = in_use(sock)
            os.write(
                write_end,
                json.dumps([choice.algorithm, choice.apply, choice.reason, used]).encode(),
            )
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    algorithm, apply, reason, used = json.loads(data)
    return algorithm, apply, reason, used


def _not_allowed() -> list[str]:
    return sorted(_REAL.available - _REAL.allowed - {_REAL.default})


@pytest.mark.skipif(
    not _PROC.exists() or os.geteuid() != 0 or not _not_allowed(),
    reason="needs root (to drop it) and a loaded algorithm that is not allowed",
)
def test_real_unprivileged_process_falls_back_to_the_default() -> None:
    """Available but not allowed, and no CAP_NET_ADMIN: the kernel refuses it,
    and the choice said so beforehand (here, without root, for real)."""
    name = _not_allowed()[0]
    algorithm, apply, reason, used = _in_unprivileged_child(name)
    assert (algorithm, apply, used) == (_REAL.default, False, _REAL.default)
    assert f"cannot use --congestion {name}: {name} is not available" in reason
    assert "not allowed" in reason


@pytest.mark.skipif(
    not _PROC.exists() or os.geteuid() != 0 or not _not_allowed(),
    reason="needs root and a loaded algorithm that is not allowed",
)
def test_real_privileged_process_may_use_what_is_not_allowed() -> None:
    """The same algorithm, as root: CAP_NET_ADMIN lets the socket take it."""
    name = _not_allowed()[0]
    choice = decide(name, _REAL)
    assert (choice.algorithm, choice.apply) == (name, True)
    assert choice.reason.endswith("(requested; available, privileged)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert tune_socket(_Transport(sock), name) == name
