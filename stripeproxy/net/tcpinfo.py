"""A subflow's kernel view of its own sending: ``getsockopt(TCP_INFO)`` (Linux).

``--subflows auto`` opens more subflows only while they are loss-limited
(:mod:`stripeproxy.core.kcontrol`), and only the kernel knows that: how many
segments it retransmitted, its congestion window, what is in flight and
whether the last rate sample was app-limited.  This module reads those
fields from ``struct tcp_info`` by their offsets in ``linux/tcp.h`` (stable
ABI: fields are only ever appended, and a kernel returns as many bytes as
it has) into a :class:`~stripeproxy.core.kcontrol.TcpSample`; the decision
itself is the pure :func:`~stripeproxy.core.kcontrol.loss_limited`.

Elsewhere (no ``TCP_INFO``, or a kernel too old for a field) :func:`read`
returns None and the caller treats the subflow as not loss-limited, so the
controller stays where it is rather than growing on a guess.
"""

from __future__ import annotations

import socket
import struct

from stripeproxy.core.kcontrol import TcpSample
from stripeproxy.net.congestion import tcp_option

__all__ = ["SIZE", "parse", "read"]

# Offsets in struct tcp_info (include/uapi/linux/tcp.h).
_CA_STATE = struct.Struct("=B")  # tcpi_ca_state at 1
_APP_LIMITED = 7  # tcpi_delivery_rate_app_limited: bit 0 of the byte at 7
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_UNACKED = 24
_RTT = 68
_SND_CWND = 80
_TOTAL_RETRANS = 100
_NOTSENT_BYTES = 144
_MIN_RTT = 148
_DELIVERY_RATE = 160
#: Bytes a kernel must return for every field read here (Linux 4.9 and later).
SIZE = _DELIVERY_RATE + _U64.size
# Ask for more than we read: newer kernels append fields; it costs nothing.
_ASK = 256


def parse(raw: bytes) -> TcpSample | None:
    """The fields of a ``struct tcp_info``; None if ``raw`` is too short to hold them."""
    if len(raw) < SIZE:
        return None
    return TcpSample(
        ca_state=_CA_STATE.unpack_from(raw, 1)[0],
        total_retrans=_U32.unpack_from(raw, _TOTAL_RETRANS)[0],
        snd_cwnd=_U32.unpack_from(raw, _SND_CWND)[0],
        unacked=_U32.unpack_from(raw, _UNACKED)[0],
        notsent_bytes=_U32.unpack_from(raw, _NOTSENT_BYTES)[0],
        delivery_rate=_U64.unpack_from(raw, _DELIVERY_RATE)[0],
        app_limited=bool(raw[_APP_LIMITED] & 1),
        rtt_us=_U32.unpack_from(raw, _RTT)[0],
        min_rtt_us=_U32.unpack_from(raw, _MIN_RTT)[0],
    )


def read(sock: socket.socket) -> TcpSample | None:
    """``sock``'s TCP_INFO now, or None where the platform or socket cannot say."""
    raw = tcp_option(sock, "TCP_INFO", _ASK)
    return None if raw is None else parse(raw)
