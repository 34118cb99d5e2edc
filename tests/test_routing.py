"""The session routing token (SPEC.md section 2, "Routing token").

Pure: its format and known answers, with Hypothesis over session ids and
names.  TLS, in memory (the handshake of tests/test_tls.py): the SNI the
server actually receives is the session's routing name, and the server's
certificate is still checked against the configured name, so a wrong
certificate still fails.  The client subflow: a CHALLENGE on a subflow whose
SNI names another session is not answered.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_tls import Pair, _write_pair, assert_connected, assert_refused, handshake
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from stripeproxy.core import routing, wire
from stripeproxy.core.handshake import new_nonce
from stripeproxy.net.client import ClientSettings, Overlay
from stripeproxy.net.client_subflow import ClientSubflow, SubflowFactory
from stripeproxy.net.routing import carries_route, route_subflows
from stripeproxy.net.tls import (
    certificate_fingerprint,
    client_tls_creator,
    load_server_tls,
    with_server_name,
)

TOKEN = re.compile(r"[a-z2-7]{16}")
session_ids = st.binary(min_size=16, max_size=16)
# DNS names as --server-name takes them: dot-separated labels.
hostnames = st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)).map(
    ".".join
)


# ------------------------------------------------------------------ format


def test_known_answers() -> None:
    """Checked independently: ``printf 'stripeproxy routing token\\0' ; <16 bytes>``
    through ``openssl dgst -sha256 -binary | head -c 10 | base32``, lowercased."""
    assert routing.token(bytes(16)) == "sp5ivlyktaadfybu"
    assert routing.token(b"\x33" * 16) == "fqr5rvg6ag5qzre2"
    assert routing.server_name(b"\x33" * 16, "proxy.example.net") == (
        "fqr5rvg6ag5qzre2.proxy.example.net"
    )
    assert routing.server_name(b"\x33" * 16, None) == "fqr5rvg6ag5qzre2.invalid"


@given(session_ids, hostnames)
def test_a_token_is_one_dns_label_that_round_trips(session_id: bytes, suffix: str) -> None:
    token = routing.token(session_id)
    assert TOKEN.fullmatch(token)
    name = routing.server_name(session_id, suffix or None)
    assert len(name) <= 253
    assert routing.token_of(name) == token
    assert routing.token_of(name.encode("ascii")) == token


@given(session_ids, session_ids)
def test_sessions_get_their_own_tokens(first: bytes, second: bytes) -> None:
    """80 bits of a hash: two ids colliding would be a broken SHA-256."""
    assert (routing.token(first) == routing.token(second)) == (first == second)


def test_the_suffix_is_the_server_name_when_it_fits() -> None:
    session_id = bytes(16)
    token = routing.token(session_id)
    assert routing.server_name(session_id, "Proxy.Example.NET.") == f"{token}.proxy.example.net"
    longest = "a" * (253 - 17)
    assert routing.server_name(session_id, longest) == f"{token}.{longest}"
    assert routing.server_name(session_id, longest + "a") == f"{token}.invalid"
    assert routing.server_name(session_id, "") == f"{token}.invalid"


@pytest.mark.parametrize(
    "name",
    [
        None,
        "",
        "proxy.example.net",
        "localhost",
        "sp5ivlyktaadfybu",  # a token without a suffix
        "SP5IVLYKTAADFYBU.example.net",  # not the client's spelling
        "sp5ivlyktaadfyb.example.net",  # 15 characters
        "sp5ivlyktaadfybuu.example.net",  # 17 characters
        "sp5ivlyktaadfyb1.example.net",  # 1 is not base32
        b"\xff\xfe.example.net",
    ],
)
def test_names_that_carry_no_token(name: str | bytes | None) -> None:
    assert routing.token_of(name) is None


# -------------------------------------------------------------------- TLS

ROUTE = "sp5ivlyktaadfybu.localhost"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pair, Pair]:
    """The server's self-signed certificate, for 'localhost' only, and another
    certificate that also claims to be 'localhost'."""
    directory = tmp_path_factory.mktemp("routing")
    return _write_pair(directory / "server", "localhost"), _write_pair(
        directory / "other", "localhost"
    )


def test_the_server_receives_the_routing_name(certs: tuple[Pair, Pair]) -> None:
    cert, _ = certs
    pinned = client_tls_creator("localhost", fingerprint=certificate_fingerprint(cert.cert))
    result = handshake(
        load_server_tls(cert.cert, cert.key), with_server_name(pinned, lambda: ROUTE)
    )
    assert_connected(result)
    assert result.server_tls.getHandle().get_servername() == ROUTE.encode()


def test_a_ca_verified_client_sends_the_routing_name_and_checks_the_server_name(
    certs: tuple[Pair, Pair],
) -> None:
    """The certificate names only localhost: were it checked against the SNI,
    the handshake would fail."""
    cert, _ = certs
    checked = client_tls_creator("localhost", ca_path=cert.cert)
    result = handshake(
        load_server_tls(cert.cert, cert.key), with_server_name(checked, lambda: ROUTE)
    )
    assert_connected(result)
    assert result.server_tls.getHandle().get_servername() == ROUTE.encode()


@pytest.mark.parametrize("how", ["pin", "ca", "ca-wrong-name"])
def test_a_wrong_certificate_still_fails(certs: tuple[Pair, Pair], how: str) -> None:
    """A routing name that the certificate would match changes nothing either."""
    cert, wrong_cert = certs
    if how == "pin":
        checked = client_tls_creator(
            "localhost", fingerprint=certificate_fingerprint(wrong_cert.cert)
        )
    elif how == "ca":
        checked = client_tls_creator("localhost", ca_path=wrong_cert.cert)
    else:
        checked = client_tls_creator("wrong.example", ca_path=cert.cert)
    routed = with_server_name(checked, lambda: "localhost")
    assert_refused(handshake(load_server_tls(cert.cert, cert.key), routed))


def overlay() -> Overlay:
    return Overlay(ClientSettings(reactor=Clock(), psk=b"k" * 32))


@pytest.mark.parametrize(
    ("server_name", "suffix"), [("localhost", "localhost"), ("127.0.0.1", "invalid")]
)
def test_each_subflow_names_the_current_session(
    certs: tuple[Pair, Pair], server_name: str, suffix: str
) -> None:
    """Asked at every dial: a new session means a new name on the next subflow."""
    cert, _ = certs
    lay = overlay()
    pinned = client_tls_creator(server_name, fingerprint=certificate_fingerprint(cert.cert))
    routed = route_subflows(pinned, lay, server_name)
    names = []
    for _ in range(2):
        result = handshake(load_server_tls(cert.cert, cert.key), routed)
        assert_connected(result)
        driver = lay.current()
        assert carries_route(result.client_tls, driver)
        names.append(result.server_tls.getHandle().get_servername())
        assert names[-1] == f"{routing.token(driver.session_id)}.{suffix}".encode()
        driver.close("the next dial starts a new session")
    assert names[0] != names[1]


# -------------------------------------------------------- the client subflow


class _Connection:
    """The part of a pyOpenSSL connection that carries_route reads."""

    def __init__(self, name: bytes | None) -> None:
        self.name = name

    def get_servername(self) -> bytes | None:
        return self.name


@implementer(ISSLTransport)
class _TLSTransport(StringTransport):
    def __init__(self, name: bytes | None) -> None:
        super().__init__()
        self.connection = _Connection(name)

    def getHandle(self) -> Any:
        return self.connection

    def getPeerCertificate(self) -> None:
        return None


def dialled(lay: Overlay, transport: StringTransport) -> ClientSubflow:
    subflow = SubflowFactory(lay).buildProtocol(None)
    subflow.makeConnection(transport)
    subflow.dataReceived(wire.encode_challenge(new_nonce(), subflow.crc))
    return subflow


def auth_sent(transport: StringTransport, crc: bool) -> wire.Auth | None:
    frames = wire.FrameDecoder(crc, wire.HANDSHAKE_MAX_BODY).feed(transport.value())
    assert len(frames) <= 1
    return frames[0] if frames and isinstance(frames[0], wire.Auth) else None


def test_a_subflow_that_names_its_session_answers_the_challenge() -> None:
    lay = overlay()
    session_id = lay.current().session_id
    transport = _TLSTransport(routing.server_name(session_id, "localhost").encode())
    subflow = dialled(lay, transport)
    auth = auth_sent(transport, subflow.crc)
    assert auth is not None and auth.session_id == session_id
    assert not transport.disconnecting


def test_a_subflow_that_names_another_session_does_not_join() -> None:
    """Its balancer may have sent it to another instance than the session's."""
    lay = overlay()
    old = lay.current()
    transport = _TLSTransport(routing.server_name(old.session_id, "localhost").encode())
    old.close("replaced while the subflow dialled")
    subflow = dialled(lay, transport)
    assert auth_sent(transport, subflow.crc) is None
    assert transport.disconnecting or transport.disconnected
    assert lay.current() is not old
    assert lay.current().subflow_count == 0


@pytest.mark.parametrize("name", [b"localhost", None])
def test_a_tls_subflow_without_a_token_joins(name: bytes | None) -> None:
    """Nothing to contradict: routed by address, like an older client's."""
    lay = overlay()
    transport = _TLSTransport(name)
    subflow = dialled(lay, transport)
    auth = auth_sent(transport, subflow.crc)
    assert auth is not None and auth.session_id == lay.current().session_id


def test_a_plaintext_subflow_carries_no_route_and_joins() -> None:
    lay = overlay()
    transport = StringTransport()
    subflow = dialled(lay, transport)
    assert carries_route(transport, lay.current())
    assert auth_sent(transport, subflow.crc) is not None
