"""The overlay session core, sans-I/O, in parts (SPEC.md sections 4-7).

* :mod:`.config` -- :class:`SessionConfig` (the product's defaults) and constants;
* :mod:`.stream` -- a stream's lifecycle table, send queue and reorder buffer;
* :mod:`.recovery` -- per-subflow RTT/RTO, timeouts, re-injection, goodput;
* :mod:`.credit` -- windows and the memory budget;
* :mod:`.acks` -- ACK batching;
* :mod:`.events` -- what the session tells its driver;
* :mod:`.session` -- :class:`Session`, which composes them behind one door out.

The imports between them go one way, in that order (events stands alone).
"""

from stripeproxy.core.session.base import Transmit
from stripeproxy.core.session.config import (
    CONTROL_WINDOW,
    INITIAL_WINDOW,
    RESET_GENERAL,
    RESET_IDLE,
    KiB,
    MiB,
    SessionConfig,
    SessionError,
)
from stripeproxy.core.session.events import (
    CloseSubflow,
    Event,
    GoingAway,
    OpenRefused,
    OpenRequested,
    OpenResult,
    SessionClosed,
    StreamClosed,
    StreamData,
    StreamEof,
    StreamPaused,
    StreamReset,
    StreamResumed,
)
from stripeproxy.core.session.session import Session
from stripeproxy.core.session.stream import StreamState
from stripeproxy.core.wire import CHUNK_SIZE

__all__ = [
    "CHUNK_SIZE",
    "CONTROL_WINDOW",
    "INITIAL_WINDOW",
    "RESET_GENERAL",
    "RESET_IDLE",
    "CloseSubflow",
    "Event",
    "GoingAway",
    "KiB",
    "MiB",
    "OpenRefused",
    "OpenRequested",
    "OpenResult",
    "Session",
    "SessionClosed",
    "SessionConfig",
    "SessionError",
    "StreamClosed",
    "StreamData",
    "StreamEof",
    "StreamPaused",
    "StreamReset",
    "StreamResumed",
    "StreamState",
    "Transmit",
]
