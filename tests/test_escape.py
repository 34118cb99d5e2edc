"""printable(): network text made safe for logs and the dashboard."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stripeproxy.core.escape import printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("example.com", "example.com"),
        ("evil.com\n2026-12-01 forged line", "evil.com\\x0a2026-12-01 forged line"),
        ("a\rb", "a\\x0db"),
        ("nul\x00byte", "nul\\x00byte"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("[bold]markup[/bold]", "[bold]markup[/bold]"),
        ("back\\slash", "back\\\\slash"),
        ("line\u2028sep", "line\\u2028sep"),
        ("bidi\u202eflip", "bidi\\u202eflip"),
        ("café.example", "café.example"),
        (b"bytes\xffbad\n", "bytes\\xffbad\\x0a"),
        (b"caf\xc3\xa9", "café"),
    ],
)
def test_escapes(raw: str | bytes, shown: str) -> None:
    assert printable(raw) == shown


def test_long_values_are_cut() -> None:
    assert printable("x" * 300, limit=10) == "x" * 10 + "…"
    assert printable("x" * 10, limit=10) == "x" * 10


@given(st.one_of(st.text(), st.binary()))
def test_output_is_one_printable_line(value: str | bytes) -> None:
    out = printable(value)
    assert out.isprintable()
    assert "\n" not in out and "\r" not in out


@given(
    st.text(
        alphabet=st.characters(
            blacklist_categories=("Cc", "Cs", "Cn", "Co", "Zl", "Zp", "Cf", "Zs")
        )
    )
)
def test_plain_text_is_unchanged(value: str) -> None:
    value = value.replace("\\", "").replace("[", "").replace("]", "")
    assert printable(value, limit=len(value)) == value
