"""Target allow/deny rules (checked against resolved addresses)."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stripeproxy.core.policy import Rule, TargetPolicy, parse_rule


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


def test_no_rules_permit_everything() -> None:
    policy = TargetPolicy()
    assert policy.unrestricted
    assert policy.permits("127.0.0.1", 1) and policy.permits("::1", 65535)


def test_ipv4_rule_never_matches_ipv6() -> None:
    rule = Rule(ipaddress.ip_network("0.0.0.0/0"))
    assert rule.matches(ipaddress.ip_address("1.2.3.4"), 80)
    assert not rule.matches(ipaddress.ip_address("::1"), 80)


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_rule(text)
