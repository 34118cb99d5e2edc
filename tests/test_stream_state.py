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
