"""sidecar.coordinator.deadlines: a call's timeout is min(configured, the transaction's time
left); the map of known deadlines is bounded and forgets decided transactions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.coordinator.deadlines import (
    KEEP_AFTER_DEADLINE,
    Deadlines,
    call_timeout,
    time_left,
)


def test_time_left_and_call_timeout() -> None:
    assert time_left(None, 100.0) is None
    assert time_left(105.0, 100.0) == 5.0
    assert time_left(99.0, 100.0) == -1.0
    assert call_timeout(3.0, None, 100.0) == 3.0  # unknown deadline: the configured timeout
    assert call_timeout(3.0, 110.0, 100.0) == 3.0  # plenty of time left
    assert call_timeout(3.0, 101.5, 100.0) == 1.5  # the transaction ends first
    assert call_timeout(3.0, 99.0, 100.0) <= 0  # its time is up: no call


@given(
    configured=st.floats(0.001, 1e4),
    deadline=st.one_of(st.none(), st.floats(-1e6, 1e6)),
    now=st.floats(-1e6, 1e6),
)
def test_a_call_never_outlives_its_configured_timeout_or_the_transaction(
    configured: float, deadline: float | None, now: float
) -> None:
    got = call_timeout(configured, deadline, now)
    assert got <= configured
    if deadline is not None:
        assert now + got <= deadline + 1e-6 * max(1.0, abs(deadline))
    else:
        assert got == configured


def test_the_map_is_bounded_oldest_first_and_forgets() -> None:
    d = Deadlines(capacity=2)
    d.remember("a", 1.0, 0.0)
    d.remember("b", 2.0, 0.0)
    d.remember("a", 3.0, 0.0)  # re-remembered: now the newest
    d.remember("c", 4.0, 0.0)
    assert (d.get("a"), d.get("b"), d.get("c")) == (3.0, None, 4.0)
    assert len(d) == 2
    d.forget("a")
    d.forget("never-seen")
    assert (d.get("a"), len(d)) == (None, 1)
    with pytest.raises(ValueError):
        Deadlines(capacity=0)


def test_entries_long_past_their_deadline_go() -> None:
    # a participant never decides: without this its map would only shrink at capacity
    d = Deadlines()
    d.remember("old", 10.0, 10.0)
    d.remember("recent", 100.0, 50.0)
    d.remember("new", 200.0, 10.0 + KEEP_AFTER_DEADLINE + 1)
    assert (d.get("old"), d.get("recent"), d.get("new")) == (None, 100.0, 200.0)
    d.remember("later", 300.0, 100.0 + KEEP_AFTER_DEADLINE - 1)  # "recent" kept a minute
    assert d.get("recent") == 100.0 and len(d) == 3
