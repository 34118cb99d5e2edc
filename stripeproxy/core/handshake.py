"""Subflow authentication proofs (SPEC.md section 2), pure functions.

Both sides prove knowledge of the pre-shared key with HMAC-SHA256 over both
fresh nonces, so no secret crosses the wire and a recorded handshake cannot
be replayed on a new subflow.  Labels keep the client's and the server's
proofs from being interchangeable.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from stripeproxy.core import wire

_CLIENT_LABEL = b"stripeproxy v1 client proof"
_SERVER_LABEL = b"stripeproxy v1 server proof"


def new_nonce() -> bytes:
    return secrets.token_bytes(wire.NONCE_SIZE)


def new_session_id() -> bytes:
    return secrets.token_bytes(wire.SESSION_ID_SIZE)


def client_proof(
    psk: bytes, server_nonce: bytes, client_nonce: bytes, session_id: bytes, flags: int, key_id: str
) -> bytes:
    message = b"".join(
        [_CLIENT_LABEL, server_nonce, client_nonce, session_id, bytes([flags]), key_id.encode()]
    )
    return hmac.new(psk, message, hashlib.sha256).digest()


def server_proof(
    psk: bytes, server_nonce: bytes, client_nonce: bytes, session_id: bytes, flags: int
) -> bytes:
    message = b"".join([_SERVER_LABEL, server_nonce, client_nonce, session_id, bytes([flags])])
    return hmac.new(psk, message, hashlib.sha256).digest()


def proofs_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison, so timing does not leak how much of a proof matched."""
    return hmac.compare_digest(a, b)
