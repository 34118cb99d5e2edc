"""The session routing token: what lets a TCP balancer keep a session on one instance.

A balancer in front of several stripe-server instances must send every
subflow of a session to the instance that holds it, even when the subflows
come from different source addresses (one per uplink).  The client therefore
names its session in the TLS ClientHello's server name (SNI), the only part
of a TLS subflow a balancer can read without terminating TLS:
``<token>.<suffix>`` (SPEC.md section 2, "Routing token").

The token is a hash of the session id, so it is new for every session, the
same for every subflow of one session, and needs no state of its own.  It
says nothing about the key and proves nothing: the key proof in the AUTH
frame is what admits a subflow.
"""

from __future__ import annotations

import base64
import hashlib
import re

__all__ = ["FALLBACK_SUFFIX", "TOKEN_LENGTH", "server_name", "token", "token_of"]

#: Characters in a token: 80 bits in lowercase base32, one DNS label.
TOKEN_LENGTH = 16
#: The suffix when the server has no DNS name to borrow (an IP address, or a
#: name too long to prefix); RFC 2606 reserves it, so it resolves nowhere.
FALLBACK_SUFFIX = "invalid"

_LABEL = b"stripeproxy routing token\x00"
_TOKEN = re.compile(rf"[a-z2-7]{{{TOKEN_LENGTH}}}")
# RFC 1035: a name is at most 253 characters written without the final dot.
_MAX_NAME = 253


def token(session_id: bytes) -> str:
    """The routing token of a session: 16 lowercase base32 characters.

    A hash, not the id itself: the session id stays inside TLS.
    """
    digest = hashlib.sha256(_LABEL + session_id).digest()
    return base64.b32encode(digest[:10]).decode("ascii").lower()


def server_name(session_id: bytes, suffix: str | None) -> str:
    """The SNI a subflow of this session sends: ``<token>.<suffix>``.

    ``suffix`` is the server's DNS name (in IDNA form), so the name looks like
    any other host of the server's domain, and a balancer that also serves
    other names can tell stripeproxy's by their ending; ``None`` (an IP
    address) or a name too long to prefix use :data:`FALLBACK_SUFFIX`.
    """
    tail = suffix.rstrip(".").lower() if suffix else FALLBACK_SUFFIX
    if TOKEN_LENGTH + 1 + len(tail) > _MAX_NAME:
        tail = FALLBACK_SUFFIX
    return f"{token(session_id)}.{tail}"


def token_of(name: str | bytes | None) -> str | None:
    """The token an SNI carries, or ``None`` if its first label is not one."""
    if name is None:
        return None
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    first, dot, _ = text.partition(".")
    return first if dot and _TOKEN.fullmatch(first) else None
