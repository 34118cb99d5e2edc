"""TLS configuration for the overlay's subflows.

Every subflow between client and server is its own TLS connection, so both
ends build their options once here and hand them to Twisted endpoints.  The
client must always authenticate the server: either through a CA file (chain +
hostname, via Twisted/service-identity) or by pinning the SHA-256 fingerprint
of the server's certificate, which is what a self-signed install from
``stripe-keygen`` uses.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from stripeproxy.core.escape import printable

if TYPE_CHECKING:
    # Only a name for a type: CertificateOptions takes it, but Twisted defines it in
    # its private _sslverify module and exports it nowhere else.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = [
    "certificate_fingerprint",
    "client_tls_creator",
    "format_fingerprint",
    "load_server_tls",
    "parse_fingerprint",
    "sni_suffix",
    "with_server_name",
]

_log = Logger()

_MINIMUM_TLS = TLSVersion.TLSv1_2
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_FINGERPRINT_PREFIX = "sha256:"

# The private keys a TLS certificate can hold, which are the ones pyOpenSSL's
# PKey.from_cryptography_key accepts (not DH, X25519/X448 or post-quantum keys).
_TLSPrivateKey = (
    dsa.DSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | rsa.RSAPrivateKey
)
_TLS_PRIVATE_KEY_TYPES = (
    dsa.DSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    rsa.RSAPrivateKey,
)


def _read_certificates(path: str) -> list[x509.Certificate]:
    """Every certificate in a PEM file, so a chain file works as well as a single cert."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ValueError(f"{path}: no usable PEM certificate ({e})") from e


def _read_private_key(path: str) -> _TLSPrivateKey:
    """The unencrypted PEM key; a daemon has nobody to type a passphrase."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ValueError(f"{path}: not a usable unencrypted PEM private key ({e})") from e
    if not isinstance(key, _TLS_PRIVATE_KEY_TYPES):
        raise ValueError(f"{path}: a {type(key).__name__} cannot sign a TLS certificate")
    return key


def _identity(cert_path: str, key_path: str) -> dict[str, Any]:
    """``CertificateOptions`` arguments that present the chain in ``cert_path``.

    The key is checked against the leaf here so that a mismatched pair fails
    at startup instead of on the first subflow.
    """
    chain = _read_certificates(cert_path)
    key = _read_private_key(key_path)
    if chain[0].public_key() != key.public_key():
        raise ValueError(f"private key {key_path} does not match the certificate in {cert_path}")
    return {
        "privateKey": crypto.PKey.from_cryptography_key(key),
        "certificate": crypto.X509.from_cryptography(chain[0]),
        "extraCertChain": [crypto.X509.from_cryptography(c) for c in chain[1:]],
    }


def load_server_tls(
    cert_path: str, key_path: str, client_ca_path: str | None = None
) -> IOpenSSLServerConnectionCreator:
    """Server-side TLS options from PEM files (the cert file may hold a chain, leaf first).

    With ``client_ca_path`` (mutual TLS) every client must present a
    certificate that chains to one of those CAs, or its handshake fails before
    it can even try a pre-shared key.
    """
    extra: dict[str, Any] = {}
    if client_ca_path is not None:
        extra["trustRoot"] = _trust_root(_load_ca(client_ca_path))
    return CertificateOptions(
        **_identity(cert_path, key_path), raiseMinimumTo=_MINIMUM_TLS, **extra
    )


def _load_ca(ca_path: str) -> list[Certificate]:
    """The certificates in ``ca_path``; they replace, not extend, the platform store."""
    return [
        Certificate(crypto.X509.from_cryptography(c))  # type: ignore[no-untyped-call]
        for c in _read_certificates(ca_path)
    ]


def _trust_root(certificates: list[Certificate]) -> IOpenSSLTrustRoot:
    """``trustRootFromCertificates`` with a type: Twisted leaves that function unannotated."""
    root: IOpenSSLTrustRoot = trustRootFromCertificates(certificates)  # type: ignore[no-untyped-call]
    return root


def _is_ip_literal(hostname: str) -> bool:
    """IP literals are matched against IP SANs and must not be sent as SNI (RFC 6066)."""
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


def sni_suffix(hostname: str) -> str | None:
    """The DNS name (IDNA form) a routing token may prefix; ``None`` for an IP address."""
    return None if _is_ip_literal(hostname) else hostname.encode("idna").decode("ascii")


@implementer(IOpenSSLClientConnectionCreator)
class _ServerCheckingCreator:
    """Client TLS that accepts the server only if its certificate passes our checks.

    With a pin, the leaf certificate must match it; pinning replaces chain
    validation (the usual server is self-signed), so chain errors are
    tolerated unless CA certificates are also given, in which case the chain
    and the hostname must pass as well.  Validity dates are not checked in
    pin-only mode: the pin names one exact certificate.  With CA certificates
    alone, the chain (dates included) and the hostname decide, as they would
    for Twisted's ``optionsForClientTLS``; the check is ours rather than
    Twisted's because Twisted's sets the SNI to the verified name at the start
    of every handshake, which would overwrite a routing token.
    """

    def __init__(
        self,
        hostname: str,
        pin: bytes | None,
        ca_certificates: list[Certificate] | None = None,
        identity: dict[str, Any] | None = None,
    ) -> None:
        self._hostname = hostname
        self._pin = pin
        self._check_chain = ca_certificates is not None
        self._is_ip = _is_ip_literal(hostname)
        # CertificateOptions supplies Twisted's cipher list and TLS floor; with a
        # CA it also loads the store whose chain verdict arrives as `ok`.
        # ``identity`` is our own certificate, for a server that wants one.
        extra = dict(identity or {})
        if ca_certificates is not None:
            extra["trustRoot"] = _trust_root(ca_certificates)
        self._options = CertificateOptions(raiseMinimumTo=_MINIMUM_TLS, **extra)

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """A connection whose handshake fails unless the server's certificate passes."""
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if not self._is_ip:
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        return connection

    def _verify(
        self, connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        """OpenSSL verify callback; never raises, so a bug fails the handshake cleanly.

        (pyOpenSSL would re-raise an exception later from inside the TLS
        transport's read path rather than as a handshake failure.)
        """
        try:
            if depth > 0:
                return bool(ok) or not self._check_chain
            leaf = cert.to_cryptography()
            return (self._pin is None or self._pin_matches(leaf, self._pin)) and (
                not self._check_chain or (bool(ok) and self._name_matches(leaf))
            )
        except Exception:
            _log.failure("while verifying the server certificate")
            return False

    def _pin_matches(self, leaf: x509.Certificate, pin: bytes) -> bool:
        """Constant-time pin comparison, logging the presented value to ease debugging."""
        presented = leaf.fingerprint(hashes.SHA256())
        if hmac.compare_digest(presented, pin):
            return True
        _log.warn(
            "server certificate fingerprint {presented} does not match pinned {pinned}",
            presented=format_fingerprint(presented),
            pinned=format_fingerprint(pin),
        )
        return False

    def _name_matches(self, leaf: x509.Certificate) -> bool:
        """The same service-identity check optionsForClientTLS applies."""
        try:
            if self._is_ip:
                verify_certificate_ip_address(leaf, self._hostname)
            else:
                verify_certificate_hostname(leaf, self._hostname)
        except (VerificationError, CertificateError) as e:
            _log.warn(
                "server certificate does not match {hostname}: {error}",
                hostname=self._hostname,
                error=printable(str(e)),  # names from the server's certificate
            )
            return False
        return True


@implementer(IOpenSSLClientConnectionCreator)
class _NamingCreator:
    """Another creator's connections, with the SNI that ``name`` gives at each dial."""

    def __init__(self, checked: IOpenSSLClientConnectionCreator, name: Callable[[], str]) -> None:
        self._checked = checked
        self._name = name

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection: SSL.Connection = self._checked.clientConnectionForTLS(tlsProtocol)
        # Replaces the verified name the inner creator set; its verify
        # callback still checks the certificate against that name.
        connection.set_tlsext_host_name(self._name().encode("ascii"))
        return connection


def with_server_name(
    creator: IOpenSSLClientConnectionCreator, name: Callable[[], str]
) -> IOpenSSLClientConnectionCreator:
    """``creator`` (from :func:`client_tls_creator`), sending ``name()`` as SNI.

    ``name`` is asked once per connection, when its TLS starts, so that each
    subflow names the session it is about to join.  Only the ClientHello
    changes: the server's certificate is verified exactly as before.
    """
    return _NamingCreator(creator, name)


def client_tls_creator(
    hostname: str,
    ca_path: str | None = None,
    fingerprint: str | None = None,
    client_cert: tuple[str, str] | None = None,
) -> IOpenSSLClientConnectionCreator:
    """Client-side TLS that always verifies the server.

    ``ca_path`` verifies chain + hostname; ``fingerprint`` pins the server's
    leaf certificate (hostname not checked); with both, both must pass.
    ``client_cert`` is a (certificate, key) pair of PEM paths to present to a
    server that requires mutual TLS.
    """
    pin = parse_fingerprint(fingerprint) if fingerprint is not None else None
    identity = _identity(*client_cert) if client_cert is not None else None
    if ca_path is None and pin is None:
        raise ValueError(
            "the client must verify the server: give a CA file or a certificate fingerprint"
        )
    ca_certificates = _load_ca(ca_path) if ca_path is not None else None
    return _ServerCheckingCreator(hostname, pin, ca_certificates, identity)


def parse_fingerprint(text: str) -> bytes:
    """Raw SHA-256 digest from the forms people paste (``sha256:AB:CD:..``, ``AB:CD:..``, hex)."""
    body = text.strip()
    if body[: len(_FINGERPRINT_PREFIX)].lower() == _FINGERPRINT_PREFIX:
        body = body[len(_FINGERPRINT_PREFIX) :]
    body = body.replace(":", "")
    if not _SHA256_HEX.fullmatch(body):
        raise ValueError(
            f"not a SHA-256 certificate fingerprint: {text!r} "
            "(expected 64 hex digits, optionally colon-separated, optionally 'sha256:'-prefixed)"
        )
    return bytes.fromhex(body)


def format_fingerprint(digest: bytes) -> str:
    """Canonical ``sha256:AB:CD:..`` form, as printed by keygen and accepted by the client."""
    return _FINGERPRINT_PREFIX + digest.hex(":").upper()


def certificate_fingerprint(cert_path: str) -> str:
    """Fingerprint of the first certificate in a PEM file (the leaf a client should pin)."""
    return format_fingerprint(_read_certificates(cert_path)[0].fingerprint(hashes.SHA256()))
