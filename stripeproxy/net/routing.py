"""Session routing on the client: every subflow's SNI names the session it joins.

Two hooks for the client's wiring (SPEC.md section 2, "Routing token"):

- :func:`route_subflows` wraps the TLS creator so that each subflow's
  ClientHello carries ``<token>.<suffix>`` for the overlay's current session,
  read when the subflow's TLS starts;
- :func:`carries_route` is asked when the CHALLENGE arrives: a subflow whose
  session was replaced meanwhile carries the old session's token, so the
  balancer may have sent it to another instance, and it must not join the
  new session there (two instances would each create it).
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, ISSLTransport

from stripeproxy.core import routing
from stripeproxy.net.client import ClientSessionDriver, Overlay
from stripeproxy.net.tls import sni_suffix, with_server_name

__all__ = ["carries_route", "route_subflows"]


def route_subflows(
    creator: IOpenSSLClientConnectionCreator, overlay: Overlay, server_name: str
) -> IOpenSSLClientConnectionCreator:
    """``creator``, sending the current session's routing name as each subflow's SNI.

    ``server_name`` is the name the certificate is verified against
    (``--server-name``); it becomes the suffix, unless it is an IP address.
    """
    suffix = sni_suffix(server_name)
    return with_server_name(
        creator, lambda: routing.server_name(overlay.current().session_id, suffix)
    )


def carries_route(transport: Any, driver: ClientSessionDriver) -> bool:
    """Whether a subflow on ``transport`` may join ``driver``'s session.

    Only a token of another session contradicts: plaintext subflows carry
    none (there is no ClientHello), nor does a TLS subflow dialled without
    :func:`route_subflows`; the balancer routes those by address.
    """
    if not ISSLTransport.providedBy(transport):
        return True
    # Twisted's ISSLTransport does not declare getHandle; its TLS transports
    # have it and return the pyOpenSSL connection, whose SNI is the one we sent.
    sent = routing.token_of(cast(Any, transport).getHandle().get_servername())
    return sent is None or sent == routing.token(driver.session_id)
