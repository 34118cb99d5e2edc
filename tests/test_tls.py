"""Real in-memory TLS handshakes against the options built by stripeproxy.net.tls.

Each test wires a server and a client TLSMemoryBIOFactory together with
twisted.test.iosim, so the full OpenSSL handshake (and its verify callbacks)
runs without sockets or a reactor.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import (
    IAddress,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient

from stripeproxy.cli.keygen import generate_self_signed
from stripeproxy.net.tls import (
    certificate_fingerprint,
    client_tls_creator,
    format_fingerprint,
    load_server_tls,
    parse_fingerprint,
)

SERVER_HELLO = b"hello from the server \x00\xff"
CLIENT_HELLO = b"hello from the client \x01\xfe"


@dataclass
class Pair:
    """Paths of one certificate/key pair on disk."""

    cert: str
    key: str


def _write_pair(directory: Path, hostname: str) -> Pair:
    cert_pem, key_pem = generate_self_signed(hostname, 30)
    directory.mkdir()
    (directory / "server.crt").write_bytes(cert_pem)
    (directory / "server.key").write_bytes(key_pem)
    return Pair(str(directory / "server.crt"), str(directory / "server.key"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return _write_pair(tmp_path_factory.mktemp("tls") / "server", "localhost")


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """A second, unrelated certificate that also claims to be 'localhost'."""
    return _write_pair(tmp_path_factory.mktemp("tls") / "other", "localhost")


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pair, str]:
    """A 'localhost' certificate issued by a private CA: (chain file [leaf, CA] + key, CA file).

    Unlike the self-signed pairs, verifying it involves a certificate at depth 1.
    """
    directory = tmp_path_factory.mktemp("issued")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "chain.crt").write_bytes(leaf_cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    (directory / "leaf.key").write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    return Pair(str(directory / "chain.crt"), str(directory / "leaf.key")), str(
        directory / "ca.crt"
    )


class Endpoint(Protocol):
    """Application protocol that greets its peer and records what happens."""

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting
        self.received = b""
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        # Written before the handshake completes: TLS must hold it back.
        self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class OneShotFactory(Factory):
    """Hands out one pre-built protocol so the test can inspect it afterwards."""

    def __init__(self, proto: Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self.proto


@dataclass
class Result:
    server: Endpoint
    client: Endpoint
    server_tls: TLSMemoryBIOProtocol
    client_tls: TLSMemoryBIOProtocol


def handshake(
    server_creator: IOpenSSLServerConnectionCreator,
    client_creator: IOpenSSLClientConnectionCreator,
) -> Result:
    """Connect both sides in memory and pump until nothing more moves."""
    server_app, client_app = Endpoint(SERVER_HELLO), Endpoint(CLIENT_HELLO)
    clock = Clock()
    server_factory = TLSMemoryBIOFactory(
        server_creator, False, OneShotFactory(server_app), clock=clock
    )
    client_factory = TLSMemoryBIOFactory(
        client_creator, True, OneShotFactory(client_app), clock=clock
    )
    client_tls, server_tls, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        clock=clock,
    )
    pump.flush()
    return Result(server_app, client_app, server_tls, client_tls)


def assert_connected(result: Result) -> None:
    assert result.client.received == SERVER_HELLO
    assert result.server.received == CLIENT_HELLO
    assert result.client.lost is None
    assert result.server.lost is None


def assert_refused(result: Result) -> None:
    """The handshake failed: both sides lost, and no application byte crossed."""
    assert result.client.received == b""
    assert result.server.received == b""
    assert result.client.lost is not None
    assert result.server.lost is not None


# -- pinned fingerprint ----------------------------------------------------------------


def test_pinned_fingerprint_match_carries_data_both_ways(server: Pair) -> None:
    creator = client_tls_creator("localhost", fingerprint=certificate_fingerprint(server.cert))
    result = handshake(load_server_tls(server.cert, server.key), creator)
    assert_connected(result)
    handle = result.server_tls.getHandle()
    assert handle.get_servername() == b"localhost"
    assert handle.get_protocol_version_name() in ("TLSv1.2", "TLSv1.3")


def test_pinned_fingerprint_mismatch_fails_handshake(server: Pair, other: Pair) -> None:
    creator = client_tls_creator("localhost", fingerprint=certificate_fingerprint(other.cert))
    result = handshake(load_server_tls(server.cert, server.key), creator)
    assert_refused(result)
    assert result.client.lost is not None
    assert result.client.lost.check(SSL.Error)


def test_pinned_fingerprint_ignores_hostname_and_sends_no_sni_for_ip(server: Pair) -> None:
    # 192.0.2.1 is in no SAN: pinning alone decides.
    creator = client_tls_creator("192.0.2.1", fingerprint=certificate_fingerprint(server.cert))
    result = handshake(load_server_tls(server.cert, server.key), creator)
    assert_connected(result)
    assert result.server_tls.getHandle().get_servername() is None


def test_pin_accepts_any_supported_spelling(server: Pair) -> None:
    plain_hex = parse_fingerprint(certificate_fingerprint(server.cert)).hex()
    creator = client_tls_creator("localhost", fingerprint=plain_hex)
    assert_connected(handshake(load_server_tls(server.cert, server.key), creator))


# -- CA file -------------------------------------------------------------------------


def test_ca_file_with_matching_hostname_succeeds(server: Pair) -> None:
    creator = client_tls_creator("localhost", ca_path=server.cert)
    assert_connected(handshake(load_server_tls(server.cert, server.key), creator))


def test_ca_file_with_ip_san_succeeds(server: Pair) -> None:
    creator = client_tls_creator("127.0.0.1", ca_path=server.cert)
    assert_connected(handshake(load_server_tls(server.cert, server.key), creator))


def test_ca_file_with_wrong_hostname_fails(server: Pair) -> None:
    creator = client_tls_creator("wrong.example", ca_path=server.cert)
    assert_refused(handshake(load_server_tls(server.cert, server.key), creator))


def test_ca_file_that_did_not_issue_the_server_cert_fails(server: Pair, other: Pair) -> None:
    creator = client_tls_creator("localhost", ca_path=other.cert)
    result = handshake(load_server_tls(server.cert, server.key), creator)
    assert_refused(result)
    assert result.client.lost is not None
    assert result.client.lost.check(SSL.Error)


# -- CA file and pin together -----------------------------------------------------------


def test_ca_and_pin_both_passing_succeeds(server: Pair) -> None:
    creator = client_tls_creator(
        "localhost", ca_path=server.cert, fingerprint=certificate_fingerprint(server.cert)
    )
    assert_connected(handshake(load_server_tls(server.cert, server.key), creator))


@pytest.mark.parametrize(
    ("hostname", "ca", "pin"),
    [
        ("localhost", "server", "other"),  # pin wrong
        ("wrong.example", "server", "server"),  # hostname wrong
        ("localhost", "other", "server"),  # chain wrong
    ],
)
def test_ca_and_pin_each_must_pass(
    server: Pair, other: Pair, hostname: str, ca: str, pin: str
) -> None:
    pairs = {"server": server, "other": other}
    creator = client_tls_creator(
        hostname,
        ca_path=pairs[ca].cert,
        fingerprint=certificate_fingerprint(pairs[pin].cert),
    )
    result = handshake(load_server_tls(server.cert, server.key), creator)
    assert_refused(result)
    assert result.client.lost is not None
    assert result.client.lost.check(SSL.Error)


def test_ca_and_pin_with_ip_hostname(server: Pair) -> None:
    pin = certificate_fingerprint(server.cert)
    good = client_tls_creator("127.0.0.1", ca_path=server.cert, fingerprint=pin)
    assert_connected(handshake(load_server_tls(server.cert, server.key), good))
    bad = client_tls_creator("192.0.2.1", ca_path=server.cert, fingerprint=pin)
    assert_refused(handshake(load_server_tls(server.cert, server.key), bad))


def test_pin_alone_tolerates_an_untrusted_issuer(issued: tuple[Pair, str]) -> None:
    chain, _ = issued
    creator = client_tls_creator("localhost", fingerprint=certificate_fingerprint(chain.cert))
    assert_connected(handshake(load_server_tls(chain.cert, chain.key), creator))


def test_ca_and_pin_validate_the_issuer(issued: tuple[Pair, str], other: Pair) -> None:
    chain, ca = issued
    pin = certificate_fingerprint(chain.cert)
    trusted = client_tls_creator("localhost", ca_path=ca, fingerprint=pin)
    assert_connected(handshake(load_server_tls(chain.cert, chain.key), trusted))
    untrusted = client_tls_creator("localhost", ca_path=other.cert, fingerprint=pin)
    assert_refused(handshake(load_server_tls(chain.cert, chain.key), untrusted))


def test_client_without_verification_is_refused() -> None:
    with pytest.raises(ValueError, match="must verify the server"):
        client_tls_creator("localhost")


def test_client_rejects_bad_fingerprint_before_connecting(server: Pair) -> None:
    with pytest.raises(ValueError, match="fingerprint"):
        client_tls_creator("localhost", ca_path=server.cert, fingerprint="sha256:00:11")


# -- loading files -------------------------------------------------------------------------


def test_server_chain_file_sends_extra_certificates(
    server: Pair, other: Pair, tmp_path: Path
) -> None:
    chain = tmp_path / "chain.crt"
    chain.write_bytes(Path(server.cert).read_bytes() + Path(other.cert).read_bytes())
    creator = client_tls_creator("localhost", fingerprint=certificate_fingerprint(server.cert))
    result = handshake(load_server_tls(str(chain), server.key), creator)
    assert_connected(result)
    presented = result.client_tls.getHandle().get_peer_cert_chain(as_cryptography=True)
    assert presented is not None
    assert [c.subject for c in presented] == [
        x509.load_pem_x509_certificate(Path(p).read_bytes()).subject
        for p in (server.cert, other.cert)
    ]


def test_missing_files_name_the_path(server: Pair, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.crt")
    with pytest.raises(OSError, match=r"nope\.crt"):
        load_server_tls(missing, server.key)
    with pytest.raises(OSError, match=r"nope\.crt"):
        load_server_tls(server.cert, missing)
    with pytest.raises(OSError, match=r"nope\.crt"):
        client_tls_creator("localhost", ca_path=missing)


def test_non_pem_files_name_the_path(server: Pair, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"this is not PEM\n")
    with pytest.raises(ValueError, match=r"junk\.pem"):
        load_server_tls(str(junk), server.key)
    with pytest.raises(ValueError, match=r"junk\.pem"):
        load_server_tls(server.cert, str(junk))
    with pytest.raises(ValueError, match=r"junk\.pem"):
        client_tls_creator("localhost", ca_path=str(junk))
    with pytest.raises(ValueError, match=r"junk\.pem"):
        certificate_fingerprint(str(junk))


def test_mismatched_key_is_refused_at_load(server: Pair, other: Pair) -> None:
    with pytest.raises(ValueError, match="does not match"):
        load_server_tls(server.cert, other.key)


# -- fingerprints ----------------------------------------------------------------------------


def test_certificate_fingerprint_is_sha256_of_der(server: Pair) -> None:
    cert = x509.load_pem_x509_certificate(Path(server.cert).read_bytes())
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    expected = "sha256:" + ":".join(f"{b:02X}" for b in digest)
    assert certificate_fingerprint(server.cert) == expected


def test_format_fingerprint() -> None:
    assert format_fingerprint(bytes(range(32))) == "sha256:" + ":".join(
        f"{i:02X}" for i in range(32)
    )


DIGEST = bytes.fromhex("ab" * 16 + "0123456789abcdef" * 2)


@pytest.mark.parametrize(
    "text",
    [
        format_fingerprint(DIGEST),
        format_fingerprint(DIGEST).lower(),
        format_fingerprint(DIGEST).removeprefix("sha256:"),
        "SHA256:" + DIGEST.hex(),
        DIGEST.hex(),
        DIGEST.hex().upper(),
        "  " + DIGEST.hex() + "\n",
    ],
)
def test_parse_fingerprint_accepts(text: str) -> None:
    assert parse_fingerprint(text) == DIGEST


def test_parse_format_round_trip() -> None:
    assert parse_fingerprint(format_fingerprint(DIGEST)) == DIGEST


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256:",
        DIGEST.hex()[:-1],
        DIGEST.hex() + "0",
        DIGEST.hex()[:-2],
        DIGEST.hex() + "00",
        "zz" * 32,
        "sha1:" + DIGEST.hex(),
        "sha256:sha256:" + DIGEST.hex(),
        " ".join(DIGEST.hex()[i : i + 2] for i in range(0, 64, 2)),
    ],
)
def test_parse_fingerprint_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="fingerprint"):
        parse_fingerprint(text)
