"""stripe-keygen: generated material, file modes, idempotence and the PSK file format."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from stripeproxy.cli.keygen import generate_self_signed, load_keys, main, write_psk
from stripeproxy.net.tls import certificate_fingerprint, load_server_tls

NAMES = ("server.crt", "server.key", "psk.key")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _contents(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in NAMES}


def _run(directory: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> list[str]:
    assert main(["--dir", str(directory), *extra]) == 0
    return capsys.readouterr().out.splitlines()


def test_creates_everything_with_private_modes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "fresh" / "keys"  # parents are created too
    lines = _run(directory, capsys)

    assert _mode(directory / "server.key") == 0o600
    assert _mode(directory / "psk.key") == 0o600
    assert _mode(directory / "server.crt") == 0o644
    assert sorted(os.listdir(directory)) == sorted(NAMES)  # no temp files left behind
    assert lines == [
        f"created: {directory / 'server.crt'}",
        f"created: {directory / 'server.key'}",
        f"created: {directory / 'psk.key'}",
        f"server certificate fingerprint: {certificate_fingerprint(str(directory / 'server.crt'))}",
    ]
    assert len(load_keys(str(directory / "psk.key"))[""]) == 32
    psk_text = (directory / "psk.key").read_text()
    assert len(psk_text) == 65
    assert psk_text.endswith("\n")
    # The pair is usable as-is by the server.
    load_server_tls(str(directory / "server.crt"), str(directory / "server.key"))


def test_second_run_keeps_existing_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first_lines = _run(tmp_path, capsys)
    before = _contents(tmp_path)
    lines = _run(tmp_path, capsys)
    assert _contents(tmp_path) == before
    assert lines == [
        f"kept: {tmp_path / 'server.crt'}",
        f"kept: {tmp_path / 'server.key'}",
        f"kept: {tmp_path / 'psk.key'}",
        first_lines[-1],
    ]


def test_missing_psk_alone_is_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path, capsys)
    before = _contents(tmp_path)
    (tmp_path / "psk.key").unlink()
    lines = _run(tmp_path, capsys)
    after = _contents(tmp_path)
    assert after["server.crt"] == before["server.crt"]
    assert after["server.key"] == before["server.key"]
    assert f"created: {tmp_path / 'psk.key'}" in lines
    assert f"kept: {tmp_path / 'server.key'}" in lines


def test_force_replaces_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first_lines = _run(tmp_path, capsys)
    before = _contents(tmp_path)
    lines = _run(tmp_path, capsys, "--force")
    after = _contents(tmp_path)
    for name in NAMES:
        assert after[name] != before[name], name
    assert lines[:3] == [f"created: {tmp_path / name}" for name in NAMES]
    assert lines[-1] != first_lines[-1]
    assert _mode(tmp_path / "server.key") == 0o600
    assert _mode(tmp_path / "psk.key") == 0o600


def test_half_a_pair_is_an_error_not_a_silent_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tmp_path, capsys)
    (tmp_path / "server.crt").unlink()
    key = (tmp_path / "server.key").read_bytes()
    assert main(["--dir", str(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err
    assert not (tmp_path / "server.crt").exists()
    assert (tmp_path / "server.key").read_bytes() == key


def test_generate_self_signed_certificate_contents() -> None:
    cert_pem, key_pem = generate_self_signed("proxy.example", 10)
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)

    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "proxy.example"
    assert cert.issuer == cert.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["proxy.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    basic = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS)
    assert basic.critical
    assert basic.value.ca is False

    now = datetime.datetime.now(datetime.UTC)
    backdate = now - cert.not_valid_before_utc
    assert datetime.timedelta(minutes=4) < backdate < datetime.timedelta(minutes=6)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=10)


def test_generate_self_signed_for_an_ip_literal() -> None:
    cert = x509.load_pem_x509_certificate(generate_self_signed("192.0.2.7", 1)[0])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert ipaddress.ip_address("192.0.2.7") in san.get_values_for_type(x509.IPAddress)


def test_serials_and_keys_are_fresh() -> None:
    (cert_a, key_a), (cert_b, key_b) = generate_self_signed("a", 1), generate_self_signed("a", 1)
    assert key_a != key_b
    serial_a = x509.load_pem_x509_certificate(cert_a).serial_number
    assert serial_a != x509.load_pem_x509_certificate(cert_b).serial_number


def test_psk_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "psk.key")
    psk = write_psk(path)
    assert len(psk) == 32
    assert load_keys(path) == {"": psk}
    assert _mode(tmp_path / "psk.key") == 0o600
    assert write_psk(path) != psk  # overwrites with a fresh key


def test_load_keys_tolerates_whitespace_and_case(tmp_path: Path) -> None:
    path = tmp_path / "psk.key"
    path.write_text("\n  " + "AbCd" * 8 + "  \n\n")
    assert load_keys(str(path)) == {"": bytes.fromhex("abcd" * 8)}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no key"),
        ("ab" * 15 + "\n", "at least 16"),  # 15 bytes: too short
        ("abc" * 11, "hex"),  # odd number of digits
        ("zz" * 32, "hex"),
        ("ab" * 8 + " " + "ab" * 8, "at least 16"),  # read as NAME HEX
        ("0x" + "ab" * 32, "hex"),
        ("é" * 64, "hex"),
    ],
)
def test_load_keys_rejects(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad-psk.key"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_keys(str(path))
    assert str(path) in str(info.value)


def test_load_keys_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_keys(str(tmp_path / "absent.key"))


def test_rejects_nonpositive_days(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--dir", str(tmp_path), "--days", "0"])
    assert os.listdir(tmp_path) == []


def test_named_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(
        "# one line per client\n"
        "alice " + "aa" * 32 + "\n\n"
        "bob   " + "bb" * 16 + "  # revoke by deleting this line\n"
    )
    assert load_keys(str(path)) == {"alice": b"\xaa" * 32, "bob": b"\xbb" * 16}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("alice " + "aa" * 32 + "\nalice " + "bb" * 32, "twice"),
        ("alice " + "aa" * 32 + "\nbob", "NAME HEX"),
        ("al ice " + "aa" * 32, "NAME HEX"),
        ("alice " + "aa" * 8 + "\nbob " + "bb" * 32, "at least 16"),
    ],
)
def test_named_keys_reject(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_keys(str(path))


def test_client_certificates_chain_to_a_client_ca_made_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tmp_path, capsys, "--client", "alice")
    ca_pem = (tmp_path / "client-ca.crt").read_bytes()
    _run(tmp_path, capsys, "--client", "bob", "--client", "carol@site")
    assert (tmp_path / "client-ca.crt").read_bytes() == ca_pem  # not re-issued
    ca = x509.load_pem_x509_certificate(ca_pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _mode(tmp_path / "client-ca.key") == 0o600
    for name in ("alice", "bob", "carol@site"):
        cert = x509.load_pem_x509_certificate((tmp_path / f"client-{name}.crt").read_bytes())
        assert _mode(tmp_path / f"client-{name}.key") == 0o600
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
        key = serialization.load_pem_private_key(
            (tmp_path / f"client-{name}.key").read_bytes(), password=None
        )
        assert key.public_key() == cert.public_key()


def test_client_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--dir", str(tmp_path), "--client", "../escape"])
    assert not (tmp_path / "client-ca.crt").exists()


def test_half_a_client_ca_is_an_error_not_a_new_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tmp_path, capsys, "--client", "alice")
    ca = (tmp_path / "client-ca.crt").read_bytes()
    (tmp_path / "client-ca.key").unlink()  # moved offline, say
    assert main(["--dir", str(tmp_path), "--client", "bob", "--force"]) == 1
    assert "client-ca.key is missing" in capsys.readouterr().err
    assert (tmp_path / "client-ca.crt").read_bytes() == ca
    assert not (tmp_path / "client-bob.crt").exists()


def test_client_certificates_never_outlive_their_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tmp_path, capsys, "--client", "alice", "--days", "30")
    ca = x509.load_pem_x509_certificate((tmp_path / "client-ca.crt").read_bytes())
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= datetime.timedelta(days=3650)
    _run(tmp_path, capsys, "--client", "bob", "--days", "9000")
    bob = x509.load_pem_x509_certificate((tmp_path / "client-bob.crt").read_bytes())
    assert bob.not_valid_after_utc == ca.not_valid_after_utc
