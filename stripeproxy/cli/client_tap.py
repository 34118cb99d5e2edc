"""``twistd stripe-client``: options and service construction."""

from __future__ import annotations

from twisted.application.internet import ClientService, StreamServerEndpointService, backoffPolicy
from twisted.application.service import IService, MultiService
from twisted.internet import reactor
from twisted.internet.endpoints import wrapClientTLS
from twisted.logger import Logger
from twisted.python import usage

from stripeproxy.cli.options import (
    SESSION_PARAMETERS,
    SessionOptions,
    add_observability,
    check_host_tuning,
)
from stripeproxy.net.client import ClientSettings, Overlay, OverlayService
from stripeproxy.net.client_subflow import SubflowFactory
from stripeproxy.net.endpoints import (
    client_endpoint,
    is_endpoint_string,
    parse_host_port,
    server_endpoint,
)
from stripeproxy.net.socks import SocksFactory
from stripeproxy.net.tls import client_tls_creator


class Options(SessionOptions):
    synopsis = "[options]"
    role = "client"
    longdesc = (
        "Run a local SOCKS5 proxy whose streams are striped across K "
        "prewarmed subflows to a stripe-server."
    )
    optParameters = [
        ["server", "s", "127.0.0.1:8443", "stripe-server address: host:port or endpoint string."],
        ["listen", "l", "127.0.0.1:1080", "SOCKS5 listener: host:port or endpoint string."],
        ["subflows", "k", 6, "Subflows to keep open (K).", int],
        ["ca", None, None, "CA certificate(s) that verify the server (PEM)."],
        ["server-fingerprint", None, None, "Pinned SHA-256 fingerprint of the server cert."],
        ["server-name", None, None, "Name to verify in the server cert (default: its host)."],
        ["client-cert", None, None, "Certificate (chain) to present for mutual TLS (PEM)."],
        ["client-key", None, None, "Private key of --client-cert (PEM)."],
        ["socks-user", None, None, "Require this SOCKS5 username (RFC 1929)."],
        ["socks-password", None, None, "Password for --socks-user."],
        ["connect-timeout", None, 10.0, "Seconds to connect one subflow.", float],
        ["open-timeout", None, 30.0, "Seconds to wait for the server to open a stream.", float],
        ["key-id", None, None, "Which key of --psk-file to use (needed if it names several)."],
        ["retry-max", None, 10.0, "Longest wait between re-dials of a subflow.", float],
        *SESSION_PARAMETERS,
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if self["subflows"] < 1:
            raise usage.UsageError("--subflows must be at least 1")
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
        if bool(self["socks-user"]) != bool(self["socks-password"]):
            raise usage.UsageError("--socks-user and --socks-password go together")
        if bool(self["client-cert"]) != bool(self["client-key"]):
            raise usage.UsageError("--client-cert and --client-key go together")
        if self["no-tls"] and self["client-cert"]:
            raise usage.UsageError("--client-cert needs TLS (drop --no-tls)")
        if not self["no-tls"]:
            if not (self["ca"] or self["server-fingerprint"]):
                raise usage.UsageError(
                    "verify the server with --ca or --server-fingerprint (or use --no-tls)"
                )
            if not self["server-name"]:
                if is_endpoint_string(self["server"]):
                    raise usage.UsageError("--server-name is needed with an endpoint string")
                self["server-name"] = parse_host_port(self["server"])[0]


def makeService(options: Options) -> IService:
    check_host_tuning(Logger())
    credentials = None
    if options["socks-user"]:
        credentials = (options["socks-user"].encode(), options["socks-password"].encode())
    settings = ClientSettings(
        reactor=reactor,
        psk=options["keys"][options["key-id"]],
        key_id=options["key-id"],
        config=options.session_config(),
        socks_credentials=credentials,
        open_timeout=options["open-timeout"],
        handshake_timeout=options["handshake-timeout"],
        congestion=options["congestion"],
        max_frame=options["max-frame"] * 1024,
    )
    overlay = Overlay(settings)
    top = MultiService()
    creator = None
    if not options["no-tls"]:
        identity = None
        if options["client-cert"]:
            identity = (options["client-cert"], options["client-key"])
        creator = client_tls_creator(
            options["server-name"], options["ca"], options["server-fingerprint"], identity
        )
    factory = SubflowFactory(overlay)
    for _ in range(options["subflows"]):
        endpoint = client_endpoint(reactor, options["server"], options["connect-timeout"])
        if creator is not None:
            endpoint = wrapClientTLS(creator, endpoint)
        ClientService(
            endpoint,
            factory,
            retryPolicy=backoffPolicy(initialDelay=0.5, factor=2.0, maxDelay=options["retry-max"]),
        ).setServiceParent(top)
    socks = StreamServerEndpointService(
        server_endpoint(reactor, options["listen"]), SocksFactory(overlay)
    )
    socks.setServiceParent(top)
    k = options["subflows"]
    add_observability(
        top,
        options,
        reactor,
        reactor,
        lambda: [overlay.driver] if overlay.driver is not None else [],
        lambda: max(0, overlay.joins - k),
    )
    OverlayService(overlay).setServiceParent(top)  # last added, first stopped
    return top
