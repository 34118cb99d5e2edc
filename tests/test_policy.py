"""Target allow/deny rules (checked against resolved addresses)."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable

import pytest
import pytest_twisted
from helpers import (
    Cleanup,
    EchoFactory,
    Keys,
    Target,
    in_thread,
    socks_handshake_reply,
    start_client,
    start_server,
    wait_for,
)
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.endpoints import TCP6ServerEndpoint
from twisted.internet.error import CannotListenError

from stripeproxy.core import socks5
from stripeproxy.core.policy import (
    PRIVATE_NETWORKS,
    SPECIAL_NETWORKS,
    Rule,
    TargetPolicy,
    embedded_ipv4,
    parse_rule,
)
from stripeproxy.net.interfaces import interface_addresses, normalise
from stripeproxy.net.target import resolve


@pytest.mark.parametrize(
    ("text", "network", "low", "high"),
    [
        ("10.0.0.0/8", "10.0.0.0/8", 1, 65535),
        ("10.1.2.3", "10.1.2.3/32", 1, 65535),
        ("192.168.0.0/16:22", "192.168.0.0/16", 22, 22),
        ("0.0.0.0/0:1-1023", "0.0.0.0/0", 1, 1023),
        ("[::1/128]:8000-8080", "::1/128", 8000, 8080),
        ("fc00::/7", "fc00::/7", 1, 65535),
        ("*:25", None, 25, 25),
        ("*", None, 1, 65535),
    ],
)
def test_parse_rule(text: str, network: str | None, low: int, high: int) -> None:
    rule = parse_rule(text)
    assert rule.network == (ipaddress.ip_network(network) if network else None)
    assert (rule.low, rule.high) == (low, high)
    assert parse_rule(str(rule)) == rule


@pytest.mark.parametrize(
    "text", ["", "10.0.0.0/33", "nonsense", "10.0.0.0/8:0", "10.0.0.0/8:9-1", "[::1", "*:x"]
)
def test_bad_rules_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rule(text)


def test_deny_wins_and_allow_restricts() -> None:
    policy = TargetPolicy(
        allow=[parse_rule("10.0.0.0/8"), parse_rule("*:443")],
        deny=[parse_rule("10.9.0.0/16"), parse_rule("*:25")],
    )
    assert policy.permits("10.1.2.3", 80)
    assert not policy.permits("10.9.1.1", 80)  # denied network inside an allowed one
    assert not policy.permits("10.1.2.3", 25)  # denied port
    assert policy.permits("93.184.216.34", 443)  # allowed by port
    assert not policy.permits("93.184.216.34", 80)  # matches no allow rule
    assert not policy.permits("::ffff:10.9.0.1", 443)  # IPv4-mapped IPv6 is IPv4
    assert not policy.permits("2001:db8::1", 80)


def test_no_rules_still_deny_the_servers_own_host() -> None:
    """Without rules, public targets are dialled and loopback is not (this
    test used to assert the opposite: that was the hole of issue 10)."""
    policy = TargetPolicy()
    assert policy.permits("93.184.216.34", 1) and policy.permits("2001:db8::1", 65535)
    assert not policy.permits("127.0.0.1", 1) and not policy.permits("::1", 65535)
    # Named explicitly, loopback is reachable on every port again.
    reopened = TargetPolicy(allow=[parse_rule("127.0.0.0/8"), parse_rule("[::1/128]")])
    assert reopened.permits("127.0.0.1", 1) and reopened.permits("::1", 65535)


def test_ipv4_rule_never_matches_ipv6() -> None:
    rule = Rule(ipaddress.ip_network("0.0.0.0/0"))
    assert rule.matches(ipaddress.ip_address("1.2.3.4"), 80)
    assert not rule.matches(ipaddress.ip_address("::1"), 80)


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_rule(text)


# ------------------------------------------ every spelling of a denied host
#
# What the server dials is what net/target.py resolve() answers: an IP
# literal stands for itself; anything else goes to the system resolver, and
# getaddrinfo() accepts inet_aton() forms (decimal, hex, octal, 127.1, "0").
# The table goes through that same resolve() on the real reactor, then
# through the policy's filter(): the addresses left are the ones dialled.

# The server's own interface addresses, as the net layer would pass them.
LOCAL = normalise(["192.0.2.2", "10.0.0.5", "2001:db8:5::2", "fe80::5%eth0"])
LOOPBACK = ["127.0.0.0/8", "[::1/128]"]
CATCH_ALL = ["*", "0.0.0.0/0", "[::/0]"]
PRIVATE = [str(n) if n.version == 4 else f"[{n}]" for n in PRIVATE_NETWORKS]

DENIED, ALLOWED = False, True
SPELLINGS: list[tuple[str, int, list[str], list[str], bool]] = [
    # (target as a SOCKS client names it, port, --allow rules, --deny rules, dialled?)
    # Loopback, every spelling, denied by default.
    ("127.0.0.1", 80, [], [], DENIED),
    ("127.255.255.254", 80, [], [], DENIED),
    ("2130706433", 80, [], [], DENIED),  # decimal
    ("0x7f000001", 80, [], [], DENIED),  # hex
    ("0X7F000001", 80, [], [], DENIED),  # upper-case hex
    ("0177.0.0.1", 80, [], [], DENIED),  # octal
    ("127.1", 80, [], [], DENIED),  # short form
    ("localhost", 80, [], [], DENIED),  # a name that resolves there
    ("::1", 80, [], [], DENIED),
    ("0:0:0:0:0:0:0:1", 80, [], [], DENIED),
    ("::ffff:127.0.0.1", 80, [], [], DENIED),  # IPv4-mapped
    ("::FFFF:7F00:1", 80, [], [], DENIED),  # the same, upper-case hex
    ("::ffff:0:7f00:1", 80, [], [], DENIED),  # IPv4-translated (SIIT)
    ("::127.0.0.1", 80, [], [], DENIED),  # IPv4-compatible
    ("64:ff9b::7f00:1", 80, [], [], DENIED),  # NAT64 well-known prefix
    ("64:ff9b:1::7f00:1", 80, [], [], DENIED),  # NAT64 local-use, /96
    ("64:ff9b:1:7f00:1::", 80, [], [], DENIED),  # NAT64 local-use, /48
    ("2002:7f00:1::", 80, [], [], DENIED),  # 6to4
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", 80, [], [], DENIED),  # Teredo, client 127.0.0.1
    # Unspecified: Linux connects these to the local host.
    ("0", 80, [], [], DENIED),
    ("0.0.0.0", 80, [], [], DENIED),
    ("0.1.2.3", 80, [], [], DENIED),
    ("::", 80, [], [], DENIED),
    ("::ffff:0.0.0.0", 80, [], [], DENIED),
    # Link-local, cloud metadata, multicast, broadcast, reserved.
    ("169.254.169.254", 80, [], [], DENIED),
    ("2852039166", 80, [], [], DENIED),  # 169.254.169.254 in decimal
    ("::ffff:169.254.169.254", 80, [], [], DENIED),
    ("64:ff9b::a9fe:a9fe", 80, [], [], DENIED),
    ("2002:a9fe:a9fe::", 80, [], [], DENIED),
    ("169.254.0.1", 80, [], [], DENIED),
    ("fe80::1", 80, [], [], DENIED),
    ("FE80::1", 80, [], [], DENIED),
    ("fe80::1%eth0", 80, [], [], DENIED),  # zone id
    ("ff02::1", 80, [], [], DENIED),
    ("224.0.0.1", 80, [], [], DENIED),
    ("255.255.255.255", 80, [], [], DENIED),
    ("240.0.0.1", 80, [], [], DENIED),
    # The server's own interface addresses (LOCAL), in any form.
    ("192.0.2.2", 80, [], [], DENIED),
    ("::ffff:192.0.2.2", 80, [], [], DENIED),
    ("3221225986", 80, [], [], DENIED),  # 192.0.2.2 in decimal
    ("2001:db8:5::2", 80, [], [], DENIED),
    ("10.0.0.5", 80, [], [], DENIED),  # own address in a private range
    # Public addresses: allowed, in any spelling.
    ("93.184.216.34", 80, [], [], ALLOWED),
    ("0x5db8d822", 80, [], [], ALLOWED),  # 93.184.216.34 in hex
    ("8.8.8.8", 80, [], [], ALLOWED),
    ("134744072", 80, [], [], ALLOWED),  # 8.8.8.8 in decimal
    ("010.010.010.010", 80, [], [], ALLOWED),  # 8.8.8.8 in octal
    ("2001:4860:4860::8888", 80, [], [], ALLOWED),
    ("::ffff:93.184.216.34", 80, [], [], ALLOWED),
    ("2606:2800:220:1:248:1893:25c8:1946", 80, [], [], ALLOWED),
    ("64:ff9b::808:808", 80, [], [], ALLOWED),  # NAT64 of 8.8.8.8
    ("2002:808:808::", 80, [], [], ALLOWED),  # 6to4 of 8.8.8.8
    ("192.0.2.3", 80, [], [], ALLOWED),  # the server's neighbour, not the server
    # Private ranges: allowed by default, deniable (also through the embeddings).
    ("10.0.0.1", 80, [], [], ALLOWED),
    ("172.16.0.1", 80, [], [], ALLOWED),
    ("192.168.1.1", 80, [], [], ALLOWED),
    ("100.64.0.1", 80, [], [], ALLOWED),
    ("fd00::1", 80, [], [], ALLOWED),
    ("10.0.0.1", 80, [], PRIVATE, DENIED),
    ("::ffff:10.0.0.1", 80, [], PRIVATE, DENIED),
    ("64:ff9b::a00:1", 80, [], PRIVATE, DENIED),
    ("2002:a00:1::", 80, [], PRIVATE, DENIED),
    ("fd00::1", 80, [], PRIVATE, DENIED),
    ("93.184.216.34", 80, [], PRIVATE, ALLOWED),
    # An explicit allow of the range (or a part of it) re-opens it.
    ("127.0.0.1", 80, LOOPBACK, [], ALLOWED),
    ("2130706433", 80, LOOPBACK, [], ALLOWED),
    ("localhost", 80, LOOPBACK, [], ALLOWED),
    ("::1", 80, LOOPBACK, [], ALLOWED),
    ("::ffff:127.0.0.1", 80, LOOPBACK, [], ALLOWED),
    ("0.0.0.0", 80, LOOPBACK, [], DENIED),  # unspecified is not loopback
    ("169.254.169.254", 80, LOOPBACK, [], DENIED),
    ("93.184.216.34", 80, LOOPBACK, [], DENIED),  # allow rules restrict, as ever
    ("127.0.0.1", 80, LOOPBACK, ["127.0.0.1/32:80"], DENIED),  # --deny wins
    ("127.0.0.1", 8080, ["127.0.0.1/32:8080"], [], ALLOWED),
    ("0x7f000001", 8080, ["127.0.0.1/32:8080"], [], ALLOWED),
    ("127.0.0.1", 8081, ["127.0.0.1/32:8080"], [], DENIED),
    ("127.0.0.2", 8080, ["127.0.0.1/32:8080"], [], DENIED),
    ("169.254.169.254", 80, ["169.254.169.254/32"], [], ALLOWED),
    ("169.254.0.1", 80, ["169.254.169.254/32"], [], DENIED),
    ("192.0.2.2", 80, ["192.0.2.2/32"], [], ALLOWED),
    ("0", 80, ["0.0.0.0/8"], [], ALLOWED),
    # A catch-all allow never re-opens anything.
    ("93.184.216.34", 80, CATCH_ALL, [], ALLOWED),
    ("127.0.0.1", 80, CATCH_ALL, [], DENIED),
    ("0", 80, CATCH_ALL, [], DENIED),
    ("::", 80, CATCH_ALL, [], DENIED),
    ("169.254.169.254", 80, CATCH_ALL, [], DENIED),
    ("192.0.2.2", 80, CATCH_ALL, [], DENIED),
    ("127.0.0.1", 443, ["*:443"], [], DENIED),
    ("10.0.0.5", 80, ["10.0.0.0/8"], [], DENIED),  # a private allow holding the server
    ("10.0.0.6", 80, ["10.0.0.0/8"], [], ALLOWED),
]


@pytest.mark.parametrize(("target", "port", "allow", "deny", "dialled"), SPELLINGS)
@pytest_twisted.ensureDeferred
async def test_every_spelling(
    target: str, port: int, allow: list[str], deny: list[str], dialled: bool
) -> None:
    addresses = await resolve(reactor, target, port)
    assert addresses, f"{target} resolved to nothing"
    policy = TargetPolicy([parse_rule(r) for r in allow], [parse_rule(r) for r in deny])
    permitted = policy.filter(addresses, port, LOCAL)
    assert permitted == (addresses if dialled else []), (target, addresses)
    # check() agrees, and a denial says why.
    for address in addresses:
        verdict = policy.check(address, port, LOCAL)
        assert verdict.permitted is dialled
        assert verdict.permitted or verdict.reason


def test_the_table_covers_both_ways() -> None:
    assert len({t for t, _, _, _, d in SPELLINGS if d is DENIED}) >= 25
    assert len({t for t, _, _, _, d in SPELLINGS if d is ALLOWED}) >= 25


def test_filter_keeps_only_permitted_literals_in_order() -> None:
    """A name with several addresses, some denied: only the others are dialled."""
    answers = ["127.0.0.1", "93.184.216.34", "::1", "example.com", "2001:db8::7", "0.0.0.0"]
    assert TargetPolicy().filter(answers, 443) == ["93.184.216.34", "2001:db8::7"]
    assert TargetPolicy().filter(["127.0.0.1", "::1"], 443) == []


def test_denial_reasons_name_the_rule_and_escape_the_target() -> None:
    policy = TargetPolicy(deny=[parse_rule("10.0.0.0/8")])
    assert policy.check("10.1.2.3", 80).reason == "10.1.2.3 is denied by --deny 10.0.0.0/8"
    reason = TargetPolicy().check("169.254.169.254", 80).reason
    assert "cloud metadata" in reason and "--allow 169.254.169.254/32" in reason
    assert "127.0.0.1" in TargetPolicy().check("::ffff:7f00:1", 80).reason
    forged = TargetPolicy().check("fe80::1%eth0\nFORGED log line\0", 80)
    assert not forged.permitted
    assert "\n" not in forged.reason and "\0" not in forged.reason
    with pytest.raises(ValueError):
        TargetPolicy().check("localhost", 80)  # names are resolved first, never checked


def test_startup_line_says_what_is_open() -> None:
    line = TargetPolicy().describe(LOCAL)
    assert "4 interface addresses" in line and "ALLOWED" in line and "10.0.0.0/8" in line
    closed = TargetPolicy(deny=[parse_rule(r) for r in PRIVATE]).describe()
    assert "ALLOWED" not in closed and "denied by --deny" in closed
    assert "only --allow'ed" in TargetPolicy(allow=[parse_rule("10.0.0.0/8")]).describe()


# Every IPv6 form that carries an IPv4 address.
WRAPPERS: dict[str, Callable[[ipaddress.IPv4Address], ipaddress.IPv6Address]] = {
    "mapped": lambda v4: ipaddress.IPv6Address(b"\0" * 10 + b"\xff" * 2 + v4.packed),
    "translated": lambda v4: ipaddress.IPv6Address(b"\0" * 8 + b"\xff" * 2 + b"\0" * 2 + v4.packed),
    "compatible": lambda v4: ipaddress.IPv6Address(b"\0" * 12 + v4.packed),
    "nat64": lambda v4: ipaddress.IPv6Address(bytes.fromhex("0064ff9b") + b"\0" * 8 + v4.packed),
    "nat64-local-48": lambda v4: ipaddress.IPv6Address(
        bytes.fromhex("0064ff9b0001") + v4.packed[:2] + b"\0" + v4.packed[2:] + b"\0" * 5
    ),
    "6to4": lambda v4: ipaddress.IPv6Address(bytes.fromhex("2002") + v4.packed + b"\0" * 10),
    "teredo-server": lambda v4: ipaddress.IPv6Address(
        bytes.fromhex("20010000") + v4.packed + b"\0" * 4 + bytes.fromhex("08080808")
    ),
    "teredo-client": lambda v4: ipaddress.IPv6Address(
        bytes.fromhex("20010000")
        + bytes.fromhex("08080808")
        + b"\0" * 4
        + bytes(b ^ 0xFF for b in v4.packed)
    ),
}
special_v4 = st.sampled_from(
    [n for n, _ in SPECIAL_NETWORKS if isinstance(n, ipaddress.IPv4Network)]
).flatmap(
    lambda net: st.integers(int(net.network_address), int(net.broadcast_address)).map(
        ipaddress.IPv4Address
    )
)


@given(special_v4, st.sampled_from(sorted(WRAPPERS)), st.integers(1, 65535))
def test_no_wrapper_smuggles_a_special_address(
    v4: ipaddress.IPv4Address, wrapper: str, port: int
) -> None:
    wrapped = WRAPPERS[wrapper](v4)
    # :: and ::1 are not IPv4-compatible forms of 0.0.0.0 and 0.0.0.1 (RFC 4291).
    assert v4 in embedded_ipv4(wrapped) or (wrapper == "compatible" and int(wrapped) <= 1)
    assert not TargetPolicy().permits(str(v4), port)
    assert not TargetPolicy().permits(str(wrapped), port)
    everything = TargetPolicy(allow=[parse_rule(r) for r in CATCH_ALL])
    assert not everything.permits(str(wrapped), port)


@given(st.ip_addresses(), st.integers(1, 65535))
def test_a_catch_all_allow_opens_nothing_the_default_denies(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    everything = TargetPolicy(allow=[parse_rule(r) for r in CATCH_ALL])
    assert everything.permits(str(ip), port, LOCAL) == TargetPolicy().permits(str(ip), port, LOCAL)


# ------------------------------------------- through the real server


async def start_any_address_target(cleanup: Cleanup) -> Target:
    """An echo target on every address, IPv4 and IPv6 (dual-stack ``::``), so
    that 0.0.0.0, ::, and the host's own addresses would all reach it."""
    factory = EchoFactory()
    try:
        listening = await TCP6ServerEndpoint(reactor, 0, interface="::").listen(factory)
    except CannotListenError:
        pytest.skip("no IPv6 on this host")
    cleanup.add(listening.stopListening, "stop target")
    return Target(factory, listening.getHost().port)


# Spellings that reach a listener on "::" when allowed: the server must
# refuse every one by default, and must not have dialled anything.
REACHES_THIS_HOST = [
    "127.0.0.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "127.1",
    "localhost",
    "0",
    "0.0.0.0",
    "::",
    "::1",
    "::ffff:127.0.0.1",
    "::ffff:0.0.0.0",
]
REOPEN = ["--allow", "127.0.0.0/8", "--allow", "0.0.0.0/8", "--allow", "[::/128]"]
REOPEN += ["--allow", "[::1/128]"]


@pytest_twisted.ensureDeferred
async def test_the_server_dials_none_of_them_by_default(cleanup: Cleanup, keys: Keys) -> None:
    target = await start_any_address_target(cleanup)
    server = await start_server(cleanup, keys, False, loopback_targets=False)
    client = await start_client(cleanup, keys, server.port, False, k=2)
    for host in REACHES_THIS_HOST:
        reply = await in_thread(socks_handshake_reply, client.socks_port, host, target.port)
        assert reply == socks5.REPLY_NOT_ALLOWED, host
    assert target.factory.connections == 0
    # A catch-all allow does not change that.
    open_server = await start_server(cleanup, keys, False, ["--allow", "*"])
    open_client = await start_client(cleanup, keys, open_server.port, False, k=2)
    for host in REACHES_THIS_HOST:
        reply = await in_thread(socks_handshake_reply, open_client.socks_port, host, target.port)
        assert reply == socks5.REPLY_NOT_ALLOWED, host
    assert target.factory.connections == 0


@pytest_twisted.ensureDeferred
async def test_each_of_them_would_reach_this_host(cleanup: Cleanup, keys: Keys) -> None:
    """The control for the test above: named explicitly, every spelling does
    reach the local listener, so a refusal there was the policy's doing."""
    target = await start_any_address_target(cleanup)
    server = await start_server(cleanup, keys, False, REOPEN)
    client = await start_client(cleanup, keys, server.port, False, k=2)
    for n, host in enumerate(REACHES_THIS_HOST, 1):
        reply = await in_thread(socks_handshake_reply, client.socks_port, host, target.port)
        assert reply == socks5.REPLY_SUCCEEDED, host
        await wait_for(lambda n=n: target.factory.connections == n, f"{host} to connect")


def _own_public_address() -> str | None:
    """An address of this host outside loopback and the built-in ranges, or None."""
    for address in sorted(normalise(interface_addresses()), key=str):
        if TargetPolicy(deny=[]).permits(str(address), 1):
            return str(address)
    return None


@pytest_twisted.ensureDeferred
async def test_the_servers_own_interface_address_is_denied(cleanup: Cleanup, keys: Keys) -> None:
    """An address on one of this host's interfaces is this host, whatever its
    range: denied by default and by a catch-all, reachable when named."""
    own = _own_public_address()
    if own is None:
        pytest.skip("this host has no interface address outside the special ranges")
    target = await start_any_address_target(cleanup)
    for extra in ([], ["--allow", "*"]):
        server = await start_server(cleanup, keys, False, extra)
        client = await start_client(cleanup, keys, server.port, False, k=1)
        reply = await in_thread(socks_handshake_reply, client.socks_port, own, target.port)
        assert reply == socks5.REPLY_NOT_ALLOWED, extra
    assert target.factory.connections == 0
    rule = f"[{own}/128]" if ":" in own else f"{own}/32"
    server = await start_server(cleanup, keys, False, ["--allow", rule])
    client = await start_client(cleanup, keys, server.port, False, k=1)
    reply = await in_thread(socks_handshake_reply, client.socks_port, own, target.port)
    assert reply == socks5.REPLY_SUCCEEDED
    await wait_for(lambda: target.factory.connections == 1, "the named address to connect")
