"""Test fakes for the sans-I/O session core, shipped so users can test with them too.

* :class:`FakeOwner` (:mod:`.owner`) drains a session as the real driver does
  and records what it says: bytes written per subflow, bytes delivered per
  stream, EOFs, resets, closes, pause/resume, open requests and results.
* :class:`SessionPair` (:mod:`.pair`) joins a client and a server session on
  one :class:`~twisted.internet.task.Clock` through K fake subflows, with the
  real driver's timer class; the test decides when each frame arrives.
* :mod:`.faults` relays real TCP connections that a test can break on purpose.

Typical use::

    pair = SessionPair(k=3)
    stream_id = pair.open_stream()
    pair.settle()
    pair.write(CLIENT, stream_id, b"request", eof=True)
    pair.settle()
    assert pair.server_owner.data(stream_id) == b"request"
"""

from stripeproxy.testing.links import (
    C2S,
    CLIENT,
    DIRECTIONS,
    S2C,
    SERVER,
    Direction,
    FakeSubflow,
    Side,
    wire_size,
)
from stripeproxy.testing.owner import FakeOwner
from stripeproxy.testing.pair import SessionPair

__all__ = [
    "C2S",
    "CLIENT",
    "DIRECTIONS",
    "S2C",
    "SERVER",
    "Direction",
    "FakeOwner",
    "FakeSubflow",
    "SessionPair",
    "Side",
    "wire_size",
]
