"""``stripe-keygen``: create the secrets a fresh overlay install needs.

It writes a self-signed server certificate + key (clients pin its fingerprint)
and the pre-shared key both ends load; for mutual TLS, a client CA and one
certificate per named client (``--client NAME``).  Existing files are kept unless
``--force`` so that re-running it never rotates a deployed key by accident.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import secrets
import sys
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stripeproxy.net.tls import certificate_fingerprint

__all__ = ["generate_self_signed", "issue_client_cert", "load_keys", "main", "write_psk"]

CERT_FILE = "server.crt"
KEY_FILE = "server.key"
PSK_FILE = "psk.key"
CLIENT_CA_CERT = "client-ca.crt"
CLIENT_CA_KEY = "client-ca.key"
# The client CA outlives the certificates it issues (they end with it anyway).
CLIENT_CA_DAYS = 3650

PSK_BYTES = 32
MIN_PSK_BYTES = 16
_HEX_BYTES = re.compile(r"(?:[0-9a-fA-F]{2})+")

# Covers clock skew between the machine that generates and the peers that verify.
_BACKDATE = datetime.timedelta(minutes=5)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    days: int,
    ends_by: datetime.datetime | None = None,
) -> x509.CertificateBuilder:
    """What every certificate here shares: names, key, a fresh serial, and
    ``days`` of validity from a little in the past, never beyond ``ends_by``."""
    not_before = datetime.datetime.now(datetime.UTC) - _BACKDATE
    not_after = not_before + datetime.timedelta(days=days)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ends_by) if ends_by is not None else not_after)
    )


def generate_self_signed(hostname: str, days: int) -> tuple[bytes, bytes]:
    """A self-signed EC P-256 server certificate and its key, both PEM.

    The SAN lists ``hostname`` plus the loopback addresses so that the same
    certificate also verifies by CA file for local deployments and tests.  An
    IP-literal ``hostname`` goes in as an IP entry, as that is what clients match.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    loopback = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    else:
        names = [] if address in loopback else [x509.IPAddress(address)]
    san = x509.SubjectAlternativeName(names + [x509.IPAddress(a) for a in loopback])
    cert = (
        _builder(name, name, key, days)
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def generate_client_ca(days: int) -> tuple[bytes, bytes]:
    """A CA (certificate, key; PEM) that only signs client certificates.

    The server trusts it with ``--client-ca``; keeping it apart from any
    public CA means only certificates issued here open a subflow.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stripeproxy client CA")])
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        _builder(name, name, key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def issue_client_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, name: str, days: int
) -> tuple[bytes, bytes]:
    """A client certificate (clientAuth only) for ``name``, signed by the client CA."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the client CA key is not an EC key made by stripe-keygen")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    # Never valid past the CA: such a certificate would fail before its date.
    cert = (
        _builder(subject, ca_cert.subject, key, days, ca_cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _write_file(path: str, data: bytes, mode: int) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written secret.

    The temp file is created 0600, so a secret is never readable by others,
    not even briefly, whatever the umask.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_psk(path: str) -> bytes:
    """Write a fresh random pre-shared key as hex (mode 0600) and return its raw bytes."""
    psk = secrets.token_bytes(PSK_BYTES)
    _write_file(path, psk.hex().encode("ascii") + b"\n", 0o600)
    return psk


def _parse_key(text: str, where: str) -> bytes:
    if not _HEX_BYTES.fullmatch(text):
        raise ValueError(f"{where}: the pre-shared key must be hex digits (an even number of them)")
    psk = bytes.fromhex(text)
    if len(psk) < MIN_PSK_BYTES:
        raise ValueError(
            f"{where}: the pre-shared key is {len(psk)} bytes; at least {MIN_PSK_BYTES} "
            f"({2 * MIN_PSK_BYTES} hex digits) are required"
        )
    return psk


_KEY_ID = re.compile(r"[A-Za-z0-9._@-]{1,64}")


def load_keys(path: str) -> dict[str, bytes]:
    """Read a key file: one hex key alone (its key id is ""), or named keys.

    Named keys are one per line, ``NAME HEX``, with ``#`` comments, so one
    client's key can be revoked by deleting its line without touching the
    others.
    """
    with open(path, encoding="ascii", errors="replace") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    entries = [(n, line) for n, line in enumerate(lines, 1) if line]
    if len(entries) == 1 and len(entries[0][1].split()) == 1:
        return {"": _parse_key(entries[0][1], path)}
    keys: dict[str, bytes] = {}
    for n, line in entries:
        parts = line.split()
        if len(parts) != 2 or not _KEY_ID.fullmatch(parts[0]):
            raise ValueError(f"{path}:{n}: expected 'NAME HEX' (NAME: letters, digits, ._@-)")
        if parts[0] in keys:
            raise ValueError(f"{path}:{n}: key {parts[0]!r} appears twice")
        keys[parts[0]] = _parse_key(parts[1], f"{path}:{n}")
    if not keys:
        raise ValueError(f"{path}: no key in the file")
    return keys


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options for ``stripe-keygen``."""
    parser = argparse.ArgumentParser(
        prog="stripe-keygen",
        description="Create the server certificate/key and the pre-shared key for stripeproxy.",
    )
    parser.add_argument("--dir", required=True, help="directory to write the files into")
    parser.add_argument(
        "--hostname",
        default="localhost",
        help="DNS name the server certificate is issued for (default: %(default)s)",
    )
    parser.add_argument(
        "--days",
        type=int,
        default=825,
        help="certificate validity in days (default: %(default)s)",
    )
    parser.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="also issue a mutual-TLS client certificate for NAME (repeatable; makes "
        f"{CLIENT_CA_CERT} on first use)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace existing files instead of keeping them"
    )
    args = parser.parse_args(argv)
    if args.days < 1:
        parser.error("--days must be at least 1")
    for name in args.client:
        if not _KEY_ID.fullmatch(name):
            parser.error(f"--client {name!r}: use letters, digits and ._@- (at most 64)")
    return args


def _client_certs(args: argparse.Namespace, created: list[str], kept: list[str]) -> bool:
    """The client CA (made once) and a certificate per ``--client`` name.

    Returns False, having written nothing, if only half of the CA is there
    (say its key was moved offline): a new CA would orphan every client.
    """
    ca_cert_path = os.path.join(args.dir, CLIENT_CA_CERT)
    ca_key_path = os.path.join(args.dir, CLIENT_CA_KEY)
    have_cert, have_key = os.path.exists(ca_cert_path), os.path.exists(ca_key_path)
    if have_cert != have_key:
        present, missing = (ca_cert_path, ca_key_path) if have_cert else (ca_key_path, ca_cert_path)
        sys.stderr.write(
            f"stripe-keygen: {present} exists but {missing} is missing; put it back "
            "(a new client CA would invalidate every client certificate it issued)\n"
        )
        return False
    if have_cert:
        kept.append(ca_cert_path)  # never re-issued, not even with --force
    else:
        ca_cert_pem, ca_key_pem = generate_client_ca(max(args.days, CLIENT_CA_DAYS))
        _write_file(ca_key_path, ca_key_pem, 0o600)
        _write_file(ca_cert_path, ca_cert_pem, 0o644)
        created += [ca_cert_path, ca_key_path]
    with open(ca_cert_path, "rb") as f:
        ca_cert_pem = f.read()
    with open(ca_key_path, "rb") as f:
        ca_key_pem = f.read()
    for name in args.client:
        cert_path = os.path.join(args.dir, f"client-{name}.crt")
        key_path = os.path.join(args.dir, f"client-{name}.key")
        if os.path.exists(cert_path) and not args.force:
            kept.append(cert_path)
            continue
        cert_pem, key_pem = issue_client_cert(ca_cert_pem, ca_key_pem, name, args.days)
        _write_file(key_path, key_pem, 0o600)
        _write_file(cert_path, cert_pem, 0o644)
        created += [cert_path, key_path]
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``stripe-keygen``; returns the process exit status."""
    args = _parse_args(argv)
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    cert_path = os.path.join(args.dir, CERT_FILE)
    key_path = os.path.join(args.dir, KEY_FILE)
    psk_path = os.path.join(args.dir, PSK_FILE)
    created: list[str] = []
    kept: list[str] = []

    # The certificate and key only make sense together: keep both or make both.
    have_cert, have_key = os.path.exists(cert_path), os.path.exists(key_path)
    if have_cert != have_key and not args.force:
        present, missing = (cert_path, key_path) if have_cert else (key_path, cert_path)
        sys.stderr.write(
            f"stripe-keygen: {present} exists but {missing} is missing; "
            "rerun with --force to generate a new pair\n"
        )
        return 1
    if have_cert and not args.force:
        kept += [cert_path, key_path]
    else:
        cert_pem, key_pem = generate_self_signed(args.hostname, args.days)
        _write_file(key_path, key_pem, 0o600)
        _write_file(cert_path, cert_pem, 0o644)
        created += [cert_path, key_path]

    if os.path.exists(psk_path) and not args.force:
        kept.append(psk_path)
    else:
        write_psk(psk_path)
        created.append(psk_path)

    if args.client and not _client_certs(args, created, kept):
        return 1

    for path in created:
        sys.stdout.write(f"created: {path}\n")
    for path in kept:
        sys.stdout.write(f"kept: {path}\n")
    sys.stdout.write(f"server certificate fingerprint: {certificate_fingerprint(cert_path)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
