"""``twistd stripe-server``: options and service construction."""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet import reactor
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.python import usage

from stripeproxy.cli.listen import ListenService
from stripeproxy.cli.options import (
    KiB,
    MiB,
    SessionOptions,
    add_observability,
    attach,
    check_host_tuning,
    default_of,
    file_problem,
    session_parameters,
)
from stripeproxy.core.policy import Rule, TargetPolicy, parse_rule
from stripeproxy.core.session import SessionConfig
from stripeproxy.net import congestion
from stripeproxy.net.access import AccessLog
from stripeproxy.net.drain import DrainService
from stripeproxy.net.endpoints import server_endpoint
from stripeproxy.net.interfaces import LocalAddresses
from stripeproxy.net.loss_watch import subflow_congestion
from stripeproxy.net.server import ServerSettings
from stripeproxy.net.server_subflow import SubflowFactory
from stripeproxy.net.tls import load_server_tls
from stripeproxy.net.tls_transport import SubflowTLSFactory, server_tls_factory


class Options(SessionOptions):
    optFlags = [
        *SessionOptions.optFlags,
        [
            "proxy-protocol",
            None,
            "Expect a PROXY protocol v1/v2 header on every subflow (behind HAProxy "
            "with send-proxy-v2), so limits and logs see each client's address. "
            "Only if no client can reach --listen directly: the header is trusted.",
        ],
    ]

    synopsis = "[options]"
    role = "server"
    longdesc = (
        "Accept authenticated subflows from stripe-client, reassemble each "
        "stream and forward it to its target as one TCP connection."
    )
    required = "--psk-file, and --cert with --key (unless --no-tls)."
    example = (
        "(files from: stripe-keygen --dir keys):\n"
        "  twistd -n stripe-server --listen 0.0.0.0:8443 --psk-file keys/psk.key \\\n"
        "      --cert keys/server.crt --key keys/server.key"
    )
    optParameters = [
        ["listen", "l", "0.0.0.0:8443", "Subflow listener: host:port or endpoint string."],
        ["cert", None, None, "TLS certificate chain (PEM). Required unless --no-tls."],
        ["key", None, None, "TLS private key (PEM). Required unless --no-tls."],
        ["client-ca", None, None, "Require client certificates issued by these CA(s) (PEM)."],
        [
            "subflows",
            None,
            default_of(ServerSettings, "max_subflows"),
            "Most subflows one session may have.",
            int,
        ],
        [
            "max-sessions",
            None,
            default_of(ServerSettings, "max_sessions"),
            "Most concurrent sessions.",
            int,
        ],
        [
            "max-streams",
            None,
            default_of(SessionConfig, "max_streams"),
            "Most open streams per session.",
            int,
        ],
        [
            "max-handshakes",
            None,
            default_of(ServerSettings, "max_handshakes"),
            "Most subflows authenticating at once.",
            int,
        ],
        [
            "memory-limit",
            None,
            default_of(ServerSettings, "memory_limit", MiB),
            "MiB of stream buffers shared by all sessions.",
            int,
        ],
        [
            "connect-timeout",
            None,
            default_of(ServerSettings, "connect_timeout"),
            "Seconds to connect to a target.",
            float,
        ],
        ["drain-timeout", None, 10.0, "On SIGTERM, seconds open streams get to finish.", float],
        [
            "access-log",
            None,
            None,
            "Append one line per stream, when it ends, to this file (format: README "
            "'Access log'). Off by default: single streams are not in the main log.",
        ],
        [
            "auth-failures",
            None,
            default_of(ServerSettings, "auth_failure_limit"),
            "Failed logins from one address logged one by one, then one line a minute.",
            int,
        ],
        [
            "auth-window",
            None,
            default_of(ServerSettings, "auth_failure_window"),
            "Quiet seconds after which an address's failed logins are forgotten.",
            float,
        ],
        [
            "auth-delay-max",
            None,
            default_of(ServerSettings, "auth_delay_max"),
            "Longest delay before the next CHALLENGE to an address whose logins fail "
            "(doubles per failure from 0.5 s; a correct key always gets in).",
            float,
        ],
        [
            "sessions-per-key",
            None,
            default_of(ServerSettings, "sessions_per_key"),
            "Most live sessions one key may hold (0: no quota).",
            int,
        ],
        [
            "session-rate",
            None,
            default_of(ServerSettings, "session_creations_per_key"),
            "Most sessions one key may create per --session-rate-window (0: no quota).",
            int,
        ],
        [
            "session-rate-window",
            None,
            default_of(ServerSettings, "session_creation_interval"),
            "Seconds over which --session-rate is counted.",
            float,
        ],
        *session_parameters(ServerSettings),
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["allow"] = []
        self["deny"] = []

    def opt_allow(self, rule: str) -> None:
        """Allow targets in CIDR[:PORTS] (repeatable; with any, only matching targets
        are dialled). Loopback, link-local, multicast and this host's own addresses
        are denied unless an --allow names them (127.0.0.0/8); '*' and 0.0.0.0/0 do not."""
        self["allow"].append(self._rule(rule))

    def opt_deny(self, rule: str) -> None:
        """Deny targets in CIDR[:PORTS] (repeatable; wins over everything; private
        ranges are allowed unless denied)."""
        self["deny"].append(self._rule(rule))

    @staticmethod
    def _rule(text: str) -> Rule:
        try:
            return parse_rule(text)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        super().postOptions()
        if not self["no-tls"] and not (self["cert"] and self["key"]):
            raise usage.UsageError("--cert and --key are required unless --no-tls is given")
        if self["proxy-protocol"] and self["listen"].startswith("haproxy:"):
            raise usage.UsageError("--proxy-protocol already wraps --listen: drop 'haproxy:'")
        if self["no-tls"] and self["client-ca"]:
            raise usage.UsageError("--client-ca needs TLS (drop --no-tls)")
        limits = ("subflows", "max-sessions", "max-streams", "max-handshakes", "memory-limit")
        for name in limits:
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")
        for name in ("sessions-per-key", "session-rate"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} must be 0 (no quota) or positive")
        for name in ("auth-window", "auth-delay-max", "session-rate-window"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        self["access"] = None
        if self["access-log"]:  # opened now, so that an unwritable path is a usage error
            try:
                self["access"] = AccessLog(self["access-log"])
            except OSError as e:
                problem = file_problem(e, {"--access-log": self["access-log"]})
                raise usage.UsageError(problem) from None
        self["tls"] = None
        if not self["no-tls"]:
            # Loaded now, so that a missing or malformed file is a usage error.
            files = {name: self[name[2:]] for name in ("--cert", "--key", "--client-ca")}
            try:
                self["tls"] = load_server_tls(self["cert"], self["key"], self["client-ca"])
            except (OSError, ValueError) as e:
                raise usage.UsageError(file_problem(e, files)) from None


def server_settings(options: Options, reactor: Any) -> ServerSettings:
    """What the server's protocols need, from parsed options."""
    return ServerSettings(
        reactor=reactor,
        keys=options["keys"],
        config=dataclasses.replace(options.session_config(), max_streams=options["max-streams"]),
        max_subflows=options["subflows"],
        max_sessions=options["max-sessions"],
        connect_timeout=options["connect-timeout"],
        handshake_timeout=options["handshake-timeout"],
        **subflow_congestion(reactor, congestion.resolve(options["congestion"])),
        max_frame=options["max-frame"] * KiB,
        max_handshakes=options["max-handshakes"],
        # Behind a PROXY-protocol balancer every connection starts with its address.
        handshakes_per_address=(
            0
            if options["proxy-protocol"]
            else max(2 * options["subflows"], options["max-handshakes"] // 8)
        ),
        memory_limit=options["memory-limit"] * MiB,
        policy=TargetPolicy(allow=options["allow"], deny=options["deny"]),
        local_addresses=LocalAddresses(reactor).current,
        auth_failure_limit=options["auth-failures"],
        auth_failure_window=options["auth-window"],
        auth_delay_max=options["auth-delay-max"],
        sessions_per_key=options["sessions-per-key"],
        session_creations_per_key=options["session-rate"],
        session_creation_interval=options["session-rate-window"],
        access_log=options["access"],
    )


def makeService(options: Options) -> IService:
    check_host_tuning(Logger())
    settings = server_settings(options, reactor)
    Logger().info("{policy}", policy=settings.policy.describe(settings.local_addresses()))
    subflows = SubflowFactory(settings)
    factory: SubflowFactory | SubflowTLSFactory = subflows
    if options["tls"] is not None:
        factory = server_tls_factory(options["tls"], subflows)
    top = MultiService()  # type: ignore[no-untyped-call]
    # Stopped after the listener (services stop in reverse order).
    attach(DrainService(subflows.registry, reactor, options["drain-timeout"]), top)
    endpoint = server_endpoint(reactor, options["listen"])
    if options["proxy-protocol"]:
        endpoint = proxyEndpoint(endpoint)
    listener = ListenService(
        "subflow listener", options["listen"], endpoint, factory, reactor, options.tell_operator
    )
    attach(listener, top)
    add_observability(
        top, options, reactor, reactor, lambda: list(subflows.registry.sessions.values())
    )
    return top
