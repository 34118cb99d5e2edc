"""``twistd stripe-client``: options and service construction."""

from __future__ import annotations

import ipaddress
import itertools
from functools import partial
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet import reactor
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python import usage

from stripeproxy.cli.listen import ListenService, loopback_only
from stripeproxy.cli.options import (
    KiB,
    SessionOptions,
    add_observability,
    attach,
    check_host_tuning,
    default_of,
    file_problem,
    session_parameters,
)
from stripeproxy.core.kcontrol import KController
from stripeproxy.core.paths import (
    AUTO,
    MAX_K,
    PathSpec,
    SourceKind,
    parse_path,
    parse_subflows,
    validate_paths,
)
from stripeproxy.net import congestion
from stripeproxy.net.client import ClientSettings, Overlay, OverlayService
from stripeproxy.net.client_subflow import SubflowFactory
from stripeproxy.net.dial import DialEndpoint, DialService, DialSlot
from stripeproxy.net.endpoints import (
    client_endpoint,
    is_endpoint_string,
    parse_host_port,
    server_endpoint,
)
from stripeproxy.net.loss_watch import subflow_congestion
from stripeproxy.net.paths import AutoK, PathEndpoint, PathPool, check_source
from stripeproxy.net.routing import route_subflows
from stripeproxy.net.socks import SocksFactory
from stripeproxy.net.tls import client_tls_creator, parse_fingerprint
from stripeproxy.net.tls_transport import SubflowTLSEndpoint

# RFC 1929: a username and a password are each 1 to 255 bytes long.
RFC1929_MAX = 255
# --subflows auto: the warm minimum (one subflow's loss never leaves a path
# without one, and re-injection has somewhere to go), the ceiling, and where
# each path starts (a transfer that begins at once is not held at the minimum).
AUTO_MIN = 2
AUTO_MAX = 16
AUTO_START = 4


def _family(host: str) -> int | None:
    """4 or 6 for an address, None for a name."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


class Options(SessionOptions):
    synopsis = "[options]"
    role = "client"
    longdesc = (
        "Run a local SOCKS5 proxy whose streams are striped across K "
        "prewarmed subflows to a stripe-server."
    )
    required = "--psk-file, and --ca or --server-fingerprint (unless --no-tls)."
    example = (
        "(the fingerprint is the one stripe-keygen printed for the server):\n"
        "  twistd -n stripe-client --server proxy.example.net:8443 --psk-file keys/psk.key \\\n"
        "      --server-fingerprint sha256:AB:CD:..."
    )
    optFlags = [
        *SessionOptions.optFlags,
        [
            "allow-open-socks",
            None,
            "Let --listen be reachable beyond this host without --socks-user (an open proxy).",
        ],
    ]
    optParameters = [
        ["server", "s", "127.0.0.1:8443", "stripe-server address: host:port or endpoint string."],
        ["listen", "l", "127.0.0.1:1080", "SOCKS5 listener: host:port or endpoint string."],
        [
            "subflows",
            "k",
            6,
            "Subflows to keep open (K), per path with --path; 'auto': the count follows "
            "the measured goodput, between --subflows-min and --subflows-max.",
            parse_subflows,
        ],
        [
            "subflows-min",
            None,
            AUTO_MIN,
            "With --subflows auto: subflows kept open even when idle (per path).",
            int,
        ],
        [
            "subflows-max",
            None,
            AUTO_MAX,
            "With --subflows auto: the most subflows opened (per path).",
            int,
        ],
        ["ca", None, None, "CA certificate(s) that verify the server (PEM)."],
        ["server-fingerprint", None, None, "Pinned SHA-256 fingerprint of the server cert."],
        ["server-name", None, None, "Name to verify in the server cert (default: its host)."],
        ["client-cert", None, None, "Certificate (chain) to present for mutual TLS (PEM)."],
        ["client-key", None, None, "Private key of --client-cert (PEM)."],
        ["socks-user", None, None, "Require this SOCKS5 username (RFC 1929)."],
        ["socks-password", None, None, "Password for --socks-user (visible in ps: prefer a file)."],
        ["socks-password-file", None, None, "Read the password for --socks-user from this file."],
        ["connect-timeout", None, 10.0, "Seconds to connect one subflow.", float],
        [
            "open-timeout",
            None,
            default_of(ClientSettings, "open_timeout"),
            "Seconds to wait for the server to open a stream.",
            float,
        ],
        [
            "connect-wait",
            None,
            default_of(ClientSettings, "connect_wait"),
            "Seconds a CONNECT waits for a subflow when none is up (less if every dial fails).",
            float,
        ],
        [
            "drain-timeout",
            None,
            default_of(ClientSettings, "drain_timeout"),
            "On SIGTERM, seconds the streams in flight get to finish.",
            float,
        ],
        ["key-id", None, None, "Which key of --psk-file to use (needed if it names several)."],
        ["retry-max", None, 10.0, "Longest wait between re-dials of a subflow.", float],
        *session_parameters(ClientSettings),
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["paths"] = []

    # One line: twistd's --help prints a docstring's line breaks and indentation as they are.
    # SOURCE is an address or an interface (resolved at every dial); K defaults to --subflows.
    def opt_path(self, value: str) -> None:
        """NAME=SOURCE[:K]: K subflows from SOURCE, an address or interface (repeatable)."""
        try:
            self["paths"].append(parse_path(value))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        super().postOptions()
        self._check_paths()
        keys = self["keys"]
        if self["key-id"] is not None and list(keys) == [""]:
            # A file with one bare key: --key-id names it (the server's NAME for it).
            self["keys"] = keys = {self["key-id"]: keys[""]}
        if self["key-id"] is None:
            if len(keys) != 1:
                raise usage.UsageError("--psk-file names several keys: choose one with --key-id")
            self["key-id"] = next(iter(keys))
        elif self["key-id"] not in keys:
            raise usage.UsageError(f"--key-id {self['key-id']!r} is not in --psk-file")
        self._socks_credentials()
        if bool(self["client-cert"]) != bool(self["client-key"]):
            raise usage.UsageError("--client-cert and --client-key go together")
        if self["no-tls"] and self["client-cert"]:
            raise usage.UsageError("--client-cert needs TLS (drop --no-tls)")
        self["tls"] = None
        if not self["no-tls"]:
            if not (self["ca"] or self["server-fingerprint"]):
                raise usage.UsageError(
                    "verify the server with --ca or --server-fingerprint (or use --no-tls)"
                )
            if not self["server-name"]:
                if is_endpoint_string(self["server"]):
                    raise usage.UsageError("--server-name is needed with an endpoint string")
                self["server-name"] = parse_host_port(self["server"])[0]
            self["tls"] = self._tls_creator()

    def _check_paths(self) -> None:
        """--path and --subflows auto: one consistent set, every address local."""
        low, high = self["subflows-min"], self["subflows-max"]
        if not 1 <= low <= high <= MAX_K:
            raise usage.UsageError(
                f"need 1 <= --subflows-min ({low}) <= --subflows-max ({high}) <= {MAX_K}"
            )
        paths: list[PathSpec] = self["paths"]
        try:
            validate_paths(paths)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if paths and is_endpoint_string(self["server"]):
            raise usage.UsageError("--path needs --server as host:port, not an endpoint string")
        server = None if is_endpoint_string(self["server"]) else parse_host_port(self["server"])[0]
        server_family = _family(server) if server is not None else None
        for path in paths:
            if path.family is not None and server_family not in (None, path.family):
                raise usage.UsageError(
                    f"--path {path.name}: an IPv{path.family} source cannot reach an "
                    f"IPv{server_family} --server"
                )
            if path.kind is SourceKind.ADDRESS:
                why = check_source(path.source)
                if why is not None:
                    raise usage.UsageError(
                        f"--path {path.name}: {path.source} is not an address of this host ({why})"
                    )

    def _socks_credentials(self) -> None:
        """SOCKS authentication: password from a file, RFC 1929 lengths, no open proxy."""
        if self["socks-password-file"]:
            if self["socks-password"]:
                raise usage.UsageError("give --socks-password or --socks-password-file, not both")
            path = self["socks-password-file"]
            try:
                with open(path, encoding="utf-8") as f:
                    self["socks-password"] = f.read().rstrip("\r\n")
            except (OSError, ValueError) as e:
                raise usage.UsageError(file_problem(e, {"--socks-password-file": path})) from None
            if not self["socks-password"]:
                raise usage.UsageError(f"--socks-password-file {path} is empty")
        if bool(self["socks-user"]) != bool(self["socks-password"]):
            raise usage.UsageError("--socks-user and --socks-password(-file) go together")
        for name in ("socks-user", "socks-password"):
            size = len((self[name] or "").encode())
            if size > RFC1929_MAX:
                raise usage.UsageError(
                    f"--{name} is {size} bytes long; SOCKS (RFC 1929) allows at most {RFC1929_MAX}"
                )
        local = loopback_only(self["listen"])
        if not self["socks-user"] and local is not True and not self["allow-open-socks"]:
            reach = "may be reachable" if local is None else "is reachable"
            raise usage.UsageError(
                f"--listen {self['listen']} {reach} beyond this host and SOCKS clients need no "
                "password: listen on 127.0.0.1, add --socks-user with --socks-password-file, "
                "or pass --allow-open-socks"
            )

    def _tls_creator(self) -> IOpenSSLClientConnectionCreator:
        """Load and check the TLS files now, so a bad one is a usage error, not a traceback."""
        if self["server-fingerprint"]:
            try:
                parse_fingerprint(self["server-fingerprint"])
            except ValueError as e:
                raise usage.UsageError(f"--server-fingerprint: {e}") from None
        identity = None
        if self["client-cert"]:
            identity = (self["client-cert"], self["client-key"])
        files = {name: self[name[2:]] for name in ("--ca", "--client-cert", "--client-key")}
        try:
            return client_tls_creator(
                self["server-name"], self["ca"], self["server-fingerprint"], identity
            )
        except (OSError, ValueError) as e:
            raise usage.UsageError(file_problem(e, files)) from None


def client_settings(options: Options, reactor: Any) -> ClientSettings:
    """What the client's protocols need, from parsed options."""
    credentials = None
    if options["socks-user"]:
        credentials = (options["socks-user"].encode(), options["socks-password"].encode())
    return ClientSettings(
        reactor=reactor,
        psk=options["keys"][options["key-id"]],
        key_id=options["key-id"],
        config=options.session_config(),
        socks_credentials=credentials,
        open_timeout=options["open-timeout"],
        connect_wait=options["connect-wait"],
        drain_timeout=options["drain-timeout"],
        handshake_timeout=options["handshake-timeout"],
        **subflow_congestion(reactor, congestion.resolve(options["congestion"])),
        max_frame=options["max-frame"] * KiB,
    )


def _build_pools(options: Options, overlay: Overlay, parent: OverlayService) -> list[PathPool]:
    """One pool of dial slots per path (one implicit path without --path)."""
    creator = options["tls"]
    if creator is not None:  # each subflow's SNI names its session (SPEC.md section 2)
        creator = route_subflows(creator, overlay, options["server-name"])
    server = options["server"]
    specs: list[PathSpec | None] = list(options["paths"]) or [None]
    numbers = itertools.count(1)  # slot numbers, unique across paths
    low, high = options["subflows-min"], options["subflows-max"]
    pools: list[PathPool] = []
    for spec in specs:
        name = spec.name if spec is not None else ""
        # One factory, so one re-dial policy, per path: its slots share the server,
        # the key and the uplink; another path's failures must not slow them.
        factory = SubflowFactory(overlay, options["retry-max"], name)
        k = spec.k if spec is not None and spec.k is not None else options["subflows"]
        auto = k == AUTO
        size = min(high, max(low, AUTO_START)) if auto else int(k)

        def build(number: int, pool: PathPool, factory: SubflowFactory = factory) -> DialService:
            assert pool.endpoint is not None
            slot = DialSlot(
                number,
                server,
                creator is not None,
                options["retry-max"],
                reactor,
                key_id=options["key-id"],
                path=pool.path,
            )
            dial = DialEndpoint(pool.endpoint, factory, slot)
            return DialService(dial, factory.redial.delay, reactor)

        pool = PathPool(name, spec.source if spec is not None else "", reactor, build, numbers)
        endpoint: IStreamClientEndpoint
        if spec is None:
            endpoint = client_endpoint(reactor, server, options["connect-timeout"])
        else:
            host, port = parse_host_port(server)
            bound = PathEndpoint(reactor, host, port, options["connect-timeout"], spec, pool)
            if spec.kind is SourceKind.INTERFACE:
                pool.source_check = bound.current
            endpoint = bound
        if creator is not None:
            endpoint = SubflowTLSEndpoint(creator, endpoint)
        pool.endpoint = overlay.watch(endpoint)
        pool.factory = factory
        if auto:
            controller = KController(k_min=low, k_max=high, k_start=size)
            pool.autok = AutoK(pool, controller, reactor)
        pool.resize(size)
        attach(pool, parent)
        pools.append(pool)
    first = pools[0]
    assert first.endpoint is not None and first.factory is not None
    overlay.spare_dial = partial(first.endpoint.connect, first.factory)  # see Overlay.session_for
    return pools


def makeService(options: Options) -> IService:
    check_host_tuning(Logger())
    overlay = Overlay(client_settings(options, reactor))
    top = MultiService()  # type: ignore[no-untyped-call]
    # The subflow services' parent: added first, stopped last (after the SOCKS
    # listener), once the streams in flight have drained.
    subflows = OverlayService(overlay, reactor, options["drain-timeout"])
    attach(subflows, top)
    pools = _build_pools(options, overlay, subflows)
    socks = ListenService(
        "SOCKS listener",
        options["listen"],
        server_endpoint(reactor, options["listen"]),
        SocksFactory(overlay),
        reactor,
        options.tell_operator,
    )
    attach(socks, top)
    shown = [p for p in pools if p.path or p.autok is not None]
    add_observability(
        top,
        options,
        reactor,
        reactor,
        lambda: [overlay.driver] if overlay.driver is not None else [],
        # Joins beyond each slot's first.
        lambda: max(0, overlay.joins - sum(p.slots_joined for p in pools)),
        dials=lambda: [s.slot.status() for p in pools for s in p.slots],
        paths=lambda: [p.status() for p in shown],
    )
    return top
