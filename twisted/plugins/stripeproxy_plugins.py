"""Registers ``twistd stripe-client`` and ``twistd stripe-server``."""

from twisted.application.service import ServiceMaker

# ServiceMaker's __init__ is unannotated in Twisted.
stripe_client = ServiceMaker(  # type: ignore[no-untyped-call]
    "stripe-client",
    "stripeproxy.cli.client_tap",
    "Striping SOCKS5 overlay client.",
    "stripe-client",
)
stripe_server = ServiceMaker(  # type: ignore[no-untyped-call]
    "stripe-server",
    "stripeproxy.cli.server_tap",
    "Striping SOCKS5 overlay server.",
    "stripe-server",
)
