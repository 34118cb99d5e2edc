"""``twistd stripe-server``: options and service construction."""

from __future__ import annotations

import dataclasses

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet import reactor
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from stripeproxy.cli.options import (
    SESSION_PARAMETERS,
    SessionOptions,
    add_observability,
    check_host_tuning,
)
from stripeproxy.core.policy import Rule, TargetPolicy, parse_rule
from stripeproxy.core.session import MiB
from stripeproxy.net.drain import DrainService
from stripeproxy.net.endpoints import server_endpoint
from stripeproxy.net.server import ServerSettings
from stripeproxy.net.server_subflow import SubflowFactory
from stripeproxy.net.tls import load_server_tls


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
    optParameters = [
        ["listen", "l", "0.0.0.0:8443", "Subflow listener: host:port or endpoint string."],
        ["cert", None, None, "TLS certificate chain (PEM)."],
        ["key", None, None, "TLS private key (PEM)."],
        ["client-ca", None, None, "Require client certificates issued by these CA(s) (PEM)."],
        ["subflows", None, 16, "Most subflows one session may have.", int],
        ["max-sessions", None, 256, "Most concurrent sessions.", int],
        ["max-streams", None, 1024, "Most open streams per session.", int],
        ["max-handshakes", None, 256, "Most subflows authenticating at once.", int],
        ["memory-limit", None, 1024, "MiB of stream buffers shared by all sessions.", int],
        ["connect-timeout", None, 10.0, "Seconds to connect to a target.", float],
        ["drain-timeout", None, 10.0, "On SIGTERM, seconds open streams get to finish.", float],
        ["auth-failures", None, 10, "Failed logins from one address before it is refused.", int],
        ["auth-window", None, 60.0, "Seconds over which --auth-failures are counted.", float],
        *SESSION_PARAMETERS,
    ]

    def __init__(self) -> None:
        super().__init__()
        self["allow"] = []
        self["deny"] = []

    def opt_allow(self, rule: str) -> None:
        """Allow targets in CIDR[:PORTS] (repeatable; then only allowed targets are dialled)."""
        self["allow"].append(self._rule(rule))

    def opt_deny(self, rule: str) -> None:
        """Deny targets in CIDR[:PORTS] (repeatable; deny wins over allow)."""
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


def makeService(options: Options) -> IService:
    check_host_tuning(Logger())
    settings = ServerSettings(
        reactor=reactor,
        keys=options["keys"],
        config=dataclasses.replace(options.session_config(), max_streams=options["max-streams"]),
        max_subflows=options["subflows"],
        max_sessions=options["max-sessions"],
        connect_timeout=options["connect-timeout"],
        handshake_timeout=options["handshake-timeout"],
        congestion=options["congestion"],
        max_frame=options["max-frame"] * 1024,
        max_handshakes=options["max-handshakes"],
        # Behind a PROXY-protocol balancer every connection starts with its address.
        handshakes_per_address=(
            0
            if options["proxy-protocol"]
            else max(2 * options["subflows"], options["max-handshakes"] // 8)
        ),
        memory_limit=options["memory-limit"] * MiB,
        policy=TargetPolicy(allow=options["allow"], deny=options["deny"]),
        auth_failure_limit=options["auth-failures"],
        auth_failure_window=options["auth-window"],
    )
    subflows = SubflowFactory(settings)
    factory: SubflowFactory | TLSMemoryBIOFactory = subflows
    if not options["no-tls"]:
        factory = TLSMemoryBIOFactory(
            load_server_tls(options["cert"], options["key"], options["client-ca"]),
            False,
            subflows,
        )
    top = MultiService()
    # Stopped after the listener (services stop in reverse order).
    DrainService(subflows.registry, reactor, options["drain-timeout"]).setServiceParent(top)
    endpoint = server_endpoint(reactor, options["listen"])
    if options["proxy-protocol"]:
        endpoint = proxyEndpoint(endpoint)
    StreamServerEndpointService(endpoint, factory).setServiceParent(top)
    add_observability(
        top, options, reactor, reactor, lambda: list(subflows.registry.sessions.values())
    )
    return top
