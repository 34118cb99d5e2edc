"""Options shared by ``twistd stripe-client`` and ``twistd stripe-server``.

Every option that sets a field of a config dataclass (``SessionConfig``,
``ClientSettings``, ``ServerSettings``) takes its default from that field
(:func:`default_of`), so a default is written once and ``--help`` shows the
value the code really uses.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from twisted.application.service import IService, IServiceCollection
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage

from stripeproxy.cli.keygen import load_keys
from stripeproxy.cli.listen import ListenService, loopback_only
from stripeproxy.core.congestion import AUTO
from stripeproxy.core.paths import PathStatus
from stripeproxy.core.scheduler import SCHEDULERS
from stripeproxy.core.session import SessionConfig
from stripeproxy.net.dial import DialStatus
from stripeproxy.net.driver import SessionDriver
from stripeproxy.net.endpoints import is_endpoint_string, parse_host_port, server_endpoint

KiB = 1024
MiB = 1024 * KiB

# A full chunk plus its DATA header must fit (SPEC.md section 3).
MIN_MAX_FRAME_KIB = SessionConfig.chunk_size // KiB + 1


def default_of(cls: type[Any], name: str, unit: int = 1) -> Any:
    """The default of dataclass field ``cls.name``, in the option's unit (KiB, MiB).

    Raises if the field has no plain default or the unit does not divide it,
    so a default cannot silently drift from the dataclass.
    """
    (field,) = [f for f in dataclasses.fields(cls) if f.name == name]
    value = field.default
    if value is dataclasses.MISSING:
        raise TypeError(f"{cls.__name__}.{name} has no plain default")
    if unit == 1 or value is None:
        return value
    if isinstance(value, int) and value % unit == 0:
        return value // unit
    return value / unit


def session_parameters(settings: type[Any]) -> list[list[Any]]:
    """The parameters both taps take; ``settings`` is the tap's settings class.

    Defaults come from ``SessionConfig`` and from ``settings`` (the client's
    and the server's handshake timeout, frame limit and congestion control
    are fields of each side's own settings).
    """
    config = SessionConfig
    return [
        [
            "psk-file",
            None,
            None,
            "Required. Pre-shared key file: one hex key, or 'NAME HEX' lines.",
        ],
        [
            "heartbeat",
            None,
            default_of(config, "heartbeat_interval"),
            "Seconds between PINGs on an idle subflow.",
            float,
        ],
        [
            "dead-interval",
            None,
            default_of(config, "dead_interval"),
            "Seconds of silence after which a subflow is dropped.",
            float,
        ],
        [
            "grace",
            None,
            default_of(config, "grace_period"),
            "Seconds a session outlives its last subflow.",
            float,
        ],
        [
            "idle-timeout",
            None,
            default_of(config, "idle_timeout"),
            "Seconds a silent stream lives (0: for ever).",
            float,
        ],
        [
            "handshake-timeout",
            None,
            default_of(settings, "handshake_timeout"),
            "Seconds a new subflow has to authenticate.",
            float,
        ],
        [
            "max-frame",
            None,
            default_of(settings, "max_frame", KiB),
            f"KiB: largest frame body accepted from the peer (>= {MIN_MAX_FRAME_KIB}).",
            int,
        ],
        [
            "congestion",
            None,
            # Not the settings' default (None: leave the kernel alone): the
            # tap resolves "auto" once at start (net/congestion.py).
            AUTO,
            "TCP congestion control for subflows: auto (the system default, and bbr "
            "for each subflow that shows random loss, where this process may use it) "
            "or a name (cubic, bbr, ...).",
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics on host:port (path /metrics; ':PORT' is every interface).",
        ],
        [
            "stream-window",
            None,
            default_of(config, "stream_window", MiB),
            "MiB a stream may have in flight towards us (credit) at first; doubles, up to "
            "--session-window, while bytes held behind a slower subflow fill half of it.",
            float,
        ],
        [
            "session-window",
            None,
            default_of(config, "session_window", MiB),
            "MiB all streams of a session may have in flight to us.",
            float,
        ],
        [
            "scheduler",
            None,
            default_of(config, "scheduler"),
            "Chunk placement: adaptive (goodput-weighted) or least-queued.",
        ],
    ]


def file_problem(error: OSError | ValueError, options: dict[str, str | None]) -> str:
    """One line for an unreadable or malformed file, naming the option it came from.

    ``options`` maps option names (``--cert``) to the paths given, so that
    ``[Errno 2] No such file or directory: 'x'`` becomes ``--cert x: No such
    file or directory``.
    """
    if isinstance(error, OSError) and error.filename is not None:
        path = str(error.filename)
        return f"{_named(path, options)}: {error.strerror or error}"
    text = str(error)
    paths = {value for value in options.values() if value and text.startswith(value + ":")}
    if len(paths) == 1:
        (path,) = paths
        return _named(path, options) + text[len(path) :]
    return text


def _named(path: str, options: dict[str, str | None]) -> str:
    """``--cert PATH`` if exactly one option names this path, else the path alone."""
    names = [name for name, value in options.items() if value == path]
    return f"{names[0]} {path}" if len(names) == 1 else path


class SessionOptions(usage.Options):
    """Base for both sides: key, timers, TLS switch, and how errors and help read.

    Under twistd a usage error would be printed after the whole option
    list (about 55 lines); here it is one line, the reason first, and the
    process exits with status 2.  Used directly (tests, embedding), the
    ``UsageError`` is raised as usual.
    """

    optFlags = [
        ["no-tls", None, "Plaintext subflows with a CRC32C on every frame (lab use)."],
        ["tui", None, "Show the live dashboard (default: when stdout is a terminal)."],
        ["no-tui", None, "Never show the live dashboard."],
    ]
    role = ""
    # Shown at the end of --help: what must be given, and one command that works
    # ("(where the files come from):" and the command, indented).
    required: ClassVar[str] = ""
    example: ClassVar[str] = ""

    @property
    def tap(self) -> str:
        return f"stripe-{self.role}"

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            if self.parent is None:
                raise
            sys.stderr.write(f"{self.tap}: {e} (see: twistd {self.tap} --help)\n")
            raise SystemExit(2) from None

    def getUsage(self, width: int | None = None) -> str:
        text = super().getUsage(width)
        if self.required:
            text += f"\nRequired: {self.required}\n"
        if self.example:
            text += f"\nExample {self.example}\n"
        return text

    def postOptions(self) -> None:
        if not self["psk-file"]:
            raise usage.UsageError("--psk-file is required (create one with stripe-keygen)")
        try:
            self["keys"] = load_keys(self["psk-file"])
        except (OSError, ValueError) as e:
            raise usage.UsageError(file_problem(e, {"--psk-file": self["psk-file"]})) from None
        for name in (
            "heartbeat",
            "dead-interval",
            "grace",
            "handshake-timeout",
            "stream-window",
            "session-window",
        ):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        if self["idle-timeout"] < 0:
            raise usage.UsageError("--idle-timeout must be 0 (off) or positive")
        if self["max-frame"] < MIN_MAX_FRAME_KIB:
            raise usage.UsageError(
                f"--max-frame must be at least {MIN_MAX_FRAME_KIB} "
                f"(a {SessionConfig.chunk_size // KiB} KiB DATA frame must fit)"
            )
        if self["dead-interval"] <= self["heartbeat"]:
            raise usage.UsageError("--dead-interval must be longer than --heartbeat")
        if self["scheduler"] not in SCHEDULERS:
            raise usage.UsageError(f"--scheduler must be one of {', '.join(SCHEDULERS)}")
        for name, listening in (("listen", True), ("metrics", True), ("server", False)):
            value = self.get(name)
            if value and not is_endpoint_string(value):
                try:
                    parse_host_port(value, allow_zero=listening)
                except ValueError as e:
                    raise usage.UsageError(f"--{name}: {e}") from None
        self._resolve_tui()

    def _resolve_tui(self) -> None:
        """Decide whether the dashboard runs, and keep log lines off its screen.

        Under twistd, ``self.parent`` holds twistd's own options: a daemon has
        no terminal, and a foreground process that would log to stdout logs to
        ``stripe-ROLE.log`` instead while the dashboard owns the screen (the
        dashboard shows the latest lines in a panel).
        """
        parent = self.parent
        daemon = parent is not None and not parent.get("nodaemon", True)
        if self["no-tui"]:
            self["tui"] = False
        elif not self["tui"]:
            self["tui"] = sys.stdout.isatty() and not daemon
        if self["tui"] and daemon:
            raise usage.UsageError("--tui needs a terminal: run twistd with -n")
        if self["tui"] and parent is not None and parent.get("logfile") in (None, "", "-"):
            parent["logfile"] = f"stripe-{self.role}.log"

    def tell_operator(self, message: str) -> None:
        """Say why the process cannot start where the operator will see it.

        The line is logged already; under twistd it also goes to the terminal
        when the log goes elsewhere (a file, as behind the dashboard, or
        syslog), and in daemon mode to twistd's parent process, which waits
        on a status pipe for the daemon to report its start.  twistd writes
        that pipe only for an ``Exception``; :class:`ListenFailed` is a
        ``SystemExit`` (no traceback), so without this the parent would wait
        for ever.  The parent prints the line and exits with status 1.
        """
        parent = self.parent
        if parent is None:
            return
        pipe = parent.get("statusPipe")
        if pipe is not None:
            parent["statusPipe"] = None
            os.write(pipe, b"1 " + message.encode()[:98])  # the parent reads 100 bytes
            os.close(pipe)
            return
        logfile = parent.get("logfile")
        if not parent.get("syslog") and (logfile == "-" or (not logfile and parent["nodaemon"])):
            return  # the log is on standard output already
        if sys.__stderr__ is not None:
            sys.__stderr__.write(f"{message}\n")
            sys.__stderr__.flush()

    def session_config(self) -> SessionConfig:
        return SessionConfig(
            heartbeat_interval=self["heartbeat"],
            dead_interval=self["dead-interval"],
            grace_period=self["grace"],
            idle_timeout=self["idle-timeout"],
            crc=bool(self["no-tls"]),
            stream_window=int(self["stream-window"] * MiB),
            session_window=int(self["session-window"] * MiB),
            scheduler=self["scheduler"],
        )


_SLOW_START_AFTER_IDLE = "/proc/sys/net/ipv4/tcp_slow_start_after_idle"


def check_host_tuning(log: Logger, path: str = _SLOW_START_AFTER_IDLE) -> None:
    """Point out a host setting that slows every transfer on idle subflows."""
    try:
        with open(path) as f:
            value = f.read().strip()
    except OSError:
        return  # not Linux, or no /proc: nothing to say
    if value == "1":
        log.info(
            "net.ipv4.tcp_slow_start_after_idle is 1: idle subflows restart slowly on lossy "
            "paths; deploy/sysctl/90-stripeproxy.conf sets it to 0 (README, Performance)"
        )


def attach(service: IService, parent: IServiceCollection) -> None:
    """``service.setServiceParent(parent)``, in one place (Twisted leaves it untyped)."""
    service.setServiceParent(parent)  # type: ignore[no-untyped-call]


def warn_if_exposed(log: Logger, option: str, address: str) -> None:
    """A warning line when a listener without authentication is reachable from elsewhere."""
    if loopback_only(address) is not True:
        log.warn(
            "{option} {address} is reachable beyond this host, without authentication "
            "(use 127.0.0.1:PORT to keep it local)",
            option=option,
            address=address,
        )


def add_observability(
    top: IServiceCollection,
    options: SessionOptions,
    clock: IReactorTime,
    reactor: object,
    sessions: Callable[[], Iterable[SessionDriver]],
    redials: Callable[[], int] = lambda: 0,
    log: Logger | None = None,
    dials: Callable[[], Iterable[DialStatus]] = tuple,
    paths: Callable[[], Iterable[PathStatus]] = tuple,
) -> None:
    """Start the monitor, the dashboard and the metrics listener as asked.

    Nothing is sampled when neither is on, so the data path pays nothing.
    """
    if not (options["tui"] or options["metrics"]):
        return
    from stripeproxy.ops.observe import Monitor

    monitor = Monitor(options.role, clock, sessions, redials, dials=dials, paths=paths)
    attach(monitor, top)
    if options["metrics"]:
        from stripeproxy.ops.metrics import metrics_site

        warn_if_exposed(log or Logger(), "--metrics", options["metrics"])
        endpoint = server_endpoint(reactor, options["metrics"])
        metrics = ListenService(
            "metrics listener",
            options["metrics"],
            endpoint,
            metrics_site(monitor),
            reactor,
            options.tell_operator,
        )
        attach(metrics, top)
    if options["tui"]:
        from stripeproxy.ops.dashboard import Dashboard

        attach(Dashboard(monitor), top)
