"""The stream lifecycle table (core/session/stream.py): every state x input."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stripeproxy.core.session.stream import (
    LOCAL_FIN_SENT,
    OPENING,
    REMOTE_EOF_DELIVERED,
    TERMINAL,
    TRANSITIONS,
    RecvSide,
    Residence,
    StreamInput,
    StreamState,
    StreamStateError,
    next_state,
)
from stripeproxy.core.wire import ProtocolError

S, In = StreamState, StreamInput

# The lifecycle written out again, independently, as the expected answers.
EXPECTED = {
    S.OPENING: {In.OPENED: S.OPEN, In.LOCAL_FIN: S.OPENING_FIN, In.RESET: S.RESET},
    S.OPENING_FIN: {In.OPENED: S.SEND_CLOSED, In.RESET: S.RESET},
    S.OPEN: {In.LOCAL_FIN: S.SEND_CLOSED, In.REMOTE_EOF: S.RECV_CLOSED, In.RESET: S.RESET},
    S.SEND_CLOSED: {In.REMOTE_EOF: S.CLOSING, In.RESET: S.RESET},
    S.RECV_CLOSED: {In.LOCAL_FIN: S.CLOSING, In.RESET: S.RESET},
    S.CLOSING: {In.FIN_ACKED: S.CLOSED, In.RESET: S.RESET},
}


@pytest.mark.parametrize(("state", "event"), list(itertools.product(StreamState, StreamInput)))
def test_every_state_and_input(state: StreamState, event: StreamInput) -> None:
    if state in TERMINAL:
        assert next_state(state, event) is state  # late inputs are absorbed
    elif event in EXPECTED[state]:
        assert next_state(state, event) is EXPECTED[state][event]
    else:
        with pytest.raises(StreamStateError) as info:
            next_state(state, event)
        assert isinstance(info.value, ProtocolError)  # a protocol error: the session ends
        assert state.value in str(info.value) and event.value in str(info.value)


def test_the_table_is_exactly_the_expected_lifecycle() -> None:
    assert {(s, i): t for s, row in EXPECTED.items() for i, t in row.items()} == TRANSITIONS
    assert {S.CLOSED, S.RESET} == TERMINAL
    assert not any(s in TERMINAL for s, _ in TRANSITIONS)


@given(st.lists(st.sampled_from(list(StreamInput)), max_size=12))
def test_random_walks_keep_the_derived_sets_consistent(events: list[StreamInput]) -> None:
    """Along any walk: once our FIN is sent it stays sent, and so does the
    peer's EOF; an opening stream has delivered nothing; CLOSED needs both."""
    state = S.OPENING
    fin = eof = False
    for event in events:
        try:
            new = next_state(state, event)
        except StreamStateError:
            continue  # the session would have ended; the walk tries another input
        if new is S.RESET:
            state = new
            continue
        if state not in TERMINAL:
            assert (not fin) or new in LOCAL_FIN_SENT
            assert (not eof) or new in REMOTE_EOF_DELIVERED
        fin, eof = new in LOCAL_FIN_SENT, new in REMOTE_EOF_DELIVERED
        if new in OPENING:
            assert not eof
        if new is S.CLOSED:
            assert fin and eof
        state = new


def test_reorder_waits_are_charged_to_both_subflows() -> None:
    # Subflow 2 brings offsets 100 and 200 early; subflow 1 fills the hole at
    # 0 late.  Each early chunk waited; subflow 1 is blamed for both waits.
    residence = Residence()
    recv = RecvSide(1000)
    assert recv.receive(1, 100, b"b" * 100, sid=2, now=1.0, residence=residence) == []
    assert recv.receive(1, 200, b"c" * 100, sid=2, now=1.1, residence=residence) == []
    assert residence.subflows == {}  # nothing released yet
    pieces = recv.receive(1, 0, b"a" * 100, sid=1, now=1.5, residence=residence)
    assert b"".join(pieces) == b"a" * 100 + b"b" * 100 + b"c" * 100
    early, late = residence.subflows[2].as_dict(), residence.subflows[1].as_dict()
    assert early["waited_s"] == pytest.approx(0.9) and early["waited_chunks"] == 2
    assert early["blocked_s"] == 0 and early["blocked_chunks"] == 0
    assert late["blocked_s"] == pytest.approx(0.9) and late["blocked_chunks"] == 2
    assert late["blocked_max_s"] == pytest.approx(0.5)
    assert late["waited_chunks"] == 0
    assert recv.arrivals == {}  # nothing kept for released chunks


def test_in_order_and_duplicate_chunks_record_no_wait() -> None:
    residence = Residence()
    recv = RecvSide(1000)
    recv.receive(1, 0, b"a" * 100, sid=1, now=1.0, residence=residence)
    recv.receive(1, 0, b"a" * 100, sid=2, now=2.0, residence=residence)  # a second copy
    recv.receive(1, 100, b"b" * 100, sid=2, now=3.0, residence=residence)
    assert residence.subflows == {}
