"""Text that came from the network, made safe to log or show.

A SOCKS client picks the target name, a peer picks its GOAWAY and REJECT
reasons and its key id: written raw, a newline forges a log line, an escape
sequence rewrites the operator's terminal.  Every such value passes through
:func:`printable` first.  (The dashboard draws these values as rich ``Text``,
never as markup, so brackets stay as they are: ``[::1]:443`` reads as itself.)
"""

from __future__ import annotations

__all__ = ["printable"]

#: Longer values are cut (a 255-byte SOCKS name is the longest legitimate one).
DEFAULT_LIMIT = 256

# The one printable character escaped too: the escape character itself, so
# an escaped value cannot be confused with an original backslash sequence.
_EXTRA = {"\\": "\\\\"}


def _escape_char(ch: str) -> str:
    if ch in _EXTRA:
        return _EXTRA[ch]
    if ch.isprintable():
        return ch
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(value: str | bytes, limit: int = DEFAULT_LIMIT) -> str:
    """``value`` with every non-printable character (controls, line and
    paragraph separators, format characters) and ``\\`` escaped, cut to
    ``limit`` characters with ``…`` marking the cut.

    Bytes are decoded as UTF-8; a byte that is not UTF-8 shows as ``\\xNN``.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    cut = len(value) > limit
    text = value[:limit]
    if text.isprintable() and not any(ch in text for ch in _EXTRA):
        escaped = text
    else:
        escaped = "".join(_escape_char(ch) for ch in text)
    return escaped + "…" if cut else escaped
