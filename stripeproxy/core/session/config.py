"""Tunables and protocol constants of a session, in one place (SPEC.md section 8).

:class:`SessionConfig`'s defaults are the product's defaults: the command-line
options derive theirs from it, so a default is written once.
"""

from __future__ import annotations

from dataclasses import dataclass

from stripeproxy.core.wire import CHUNK_SIZE, ProtocolError

KiB = 1024
MiB = 1024 * KiB

#: Credit of stream 0 (control messages), both ways, renewed as it is consumed.
CONTROL_WINDOW = 256 * KiB
#: Credit every new stream starts with, both ways (SPEC.md section 4); both
#: sides assume it, so it is a protocol constant, not a tunable.
INITIAL_WINDOW = 256 * KiB
#: Seconds of ACKs per goodput sample.
GOODPUT_SAMPLE = 0.1

RESET_GENERAL = 0x01
RESET_IDLE = 0x06  # SOCKS5 "TTL expired": the stream was idle too long


class SessionError(ProtocolError):
    """The peer broke the session itself (not one subflow): end the session."""


@dataclass
class SessionConfig:
    """Tunables of one session; each default is explained in SPEC.md section 8."""

    chunk_size: int = CHUNK_SIZE
    stream_window: int = 4 * MiB
    session_window: int = 32 * MiB
    min_stream_window: int = CHUNK_SIZE
    send_buffer: int = 256 * KiB
    ack_threshold: int = 512 * KiB
    ack_delay: float = 0.002
    heartbeat_interval: float = 5.0
    dead_interval: float = 15.0
    grace_period: float = 30.0
    min_rto: float = 0.2
    initial_rto: float = 1.0
    max_rto: float = 10.0
    max_streams: int = 1024
    # Seconds without a byte from or to the local peer before a stream is
    # reset; 0 disables.  One hour: a forgotten connection cannot hold a
    # stream for ever, an interactive one is not cut.
    idle_timeout: float = 3600.0
    crc: bool = False
    # "adaptive" (goodput-weighted) or "least-queued" (the plain policy).
    # See scheduler.py.
    scheduler: str = "adaptive"
