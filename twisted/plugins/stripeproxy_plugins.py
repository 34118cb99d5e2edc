"""Registers ``twistd stripe-client`` and ``twistd stripe-server``."""

from twisted.application.service import ServiceMaker

stripe_client = ServiceMaker(
    "stripe-client",
    "stripeproxy.cli.client_tap",
    "Striping SOCKS5 overlay client.",
    "stripe-client",
)
stripe_server = ServiceMaker(
    "stripe-server",
    "stripeproxy.cli.server_tap",
    "Striping SOCKS5 overlay server.",
    "stripe-server",
)
