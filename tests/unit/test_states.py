"""The global state machine as a table (sidecar/coordinator/states.py): every pair, the
finished statuses, the answer to a repeated decision, and random event sequences."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.coordinator.states import (
    TRANSITIONS,
    BranchStatus,
    Event,
    GlobalStatus,
    IllegalTransition,
    decided_like,
    transition,
)

S = GlobalStatus
E = Event

ALL_PAIRS = list(itertools.product(GlobalStatus, Event))
ILLEGAL = [(s, e) for s, e in ALL_PAIRS if (s, e) not in TRANSITIONS]
FINISHED = [S.COMMITTED, S.ROLLBACKED, S.TIMEOUT_ROLLBACKED]


def test_the_table_is_exactly_seatas_lifecycle():
    assert TRANSITIONS == {
        (S.BEGIN, E.COMMIT): S.COMMITTING,
        (S.BEGIN, E.ROLLBACK): S.ROLLBACKING,
        (S.BEGIN, E.TIMEOUT): S.TIMEOUT_ROLLBACKING,
        (S.COMMITTING, E.PHASE_TWO_FAILED): S.COMMIT_RETRYING,
        (S.COMMITTING, E.PHASE_TWO_DONE): S.COMMITTED,
        (S.COMMIT_RETRYING, E.PHASE_TWO_FAILED): S.COMMIT_RETRYING,
        (S.COMMIT_RETRYING, E.PHASE_TWO_DONE): S.COMMITTED,
        (S.ROLLBACKING, E.PHASE_TWO_FAILED): S.ROLLBACK_RETRYING,
        (S.ROLLBACKING, E.PHASE_TWO_DONE): S.ROLLBACKED,
        (S.ROLLBACK_RETRYING, E.PHASE_TWO_FAILED): S.ROLLBACK_RETRYING,
        (S.ROLLBACK_RETRYING, E.PHASE_TWO_DONE): S.ROLLBACKED,
        (S.TIMEOUT_ROLLBACKING, E.PHASE_TWO_FAILED): S.TIMEOUT_ROLLBACK_RETRYING,
        (S.TIMEOUT_ROLLBACKING, E.PHASE_TWO_DONE): S.TIMEOUT_ROLLBACKED,
        (S.TIMEOUT_ROLLBACK_RETRYING, E.PHASE_TWO_FAILED): S.TIMEOUT_ROLLBACK_RETRYING,
        (S.TIMEOUT_ROLLBACK_RETRYING, E.PHASE_TWO_DONE): S.TIMEOUT_ROLLBACKED,
    }


@pytest.mark.parametrize(("status", "event"), list(TRANSITIONS))
def test_every_legal_pair_goes_where_the_table_says(status, event):
    assert transition(status, event) is TRANSITIONS[(status, event)]


@pytest.mark.parametrize(("status", "event"), ILLEGAL, ids=[f"{s}-{e}" for s, e in ILLEGAL])
def test_every_other_pair_raises_naming_status_and_event(status, event):
    with pytest.raises(IllegalTransition) as info:
        transition(status, event)
    err = info.value
    assert err.status is status and err.event is event
    assert repr(status.value) in str(err)
    assert repr(event.value) in str(err)


def test_illegal_pairs_cover_everything_not_in_the_table():
    assert len(ILLEGAL) + len(TRANSITIONS) == len(GlobalStatus) * len(Event)
    assert len(ILLEGAL) == 10 * 5 - 15


@pytest.mark.parametrize("status", FINISHED)
@pytest.mark.parametrize("event", list(Event))
def test_finished_statuses_accept_no_event(status, event):
    assert status.finished
    with pytest.raises(IllegalTransition):
        transition(status, event)


def test_finished_committing_and_rolling_back_flags():
    assert {s for s in GlobalStatus if s.finished} == set(FINISHED)
    assert {s for s in GlobalStatus if s.committing} == {S.COMMITTING, S.COMMIT_RETRYING}
    assert {s for s in GlobalStatus if s.rolling_back} == {
        S.ROLLBACKING,
        S.ROLLBACK_RETRYING,
        S.TIMEOUT_ROLLBACKING,
        S.TIMEOUT_ROLLBACK_RETRYING,
    }
    # Begin is none of them; no status is both directions at once
    assert not (S.BEGIN.finished or S.BEGIN.committing or S.BEGIN.rolling_back)
    assert not any(s.committing and s.rolling_back for s in GlobalStatus)


def test_only_begin_takes_a_decision_or_a_timeout():
    for event in (E.COMMIT, E.ROLLBACK, E.TIMEOUT):
        assert [s for s, e in TRANSITIONS if e is event] == [S.BEGIN]


def test_phase_two_done_and_branch_status_names():
    assert {b for b in BranchStatus if b.phase_two_done} == {
        BranchStatus.PHASE_TWO_COMMITTED,
        BranchStatus.PHASE_TWO_ROLLBACKED,
    }
    assert [s.value for s in GlobalStatus] == [
        "Begin",
        "Committing",
        "CommitRetrying",
        "Rollbacking",
        "RollbackRetrying",
        "TimeoutRollbacking",
        "TimeoutRollbackRetrying",
        "Committed",
        "Rollbacked",
        "TimeoutRollbacked",
    ]


# --- decided_like: a repeated decision is answered, not refused ------------------------------

COMMIT_LIKE = {S.COMMITTING, S.COMMIT_RETRYING, S.COMMITTED}
ROLLBACK_LIKE = {
    S.ROLLBACKING,
    S.ROLLBACK_RETRYING,
    S.TIMEOUT_ROLLBACKING,
    S.TIMEOUT_ROLLBACK_RETRYING,
    S.ROLLBACKED,
    S.TIMEOUT_ROLLBACKED,
}


@pytest.mark.parametrize("status", list(GlobalStatus))
def test_decided_like_commit(status):
    assert decided_like(status, E.COMMIT) is (status in COMMIT_LIKE)


@pytest.mark.parametrize("status", list(GlobalStatus))
def test_decided_like_rollback_includes_timeout_rollbacks(status):
    assert decided_like(status, E.ROLLBACK) is (status in ROLLBACK_LIKE)


@pytest.mark.parametrize("status", list(GlobalStatus))
@pytest.mark.parametrize("event", [E.TIMEOUT, E.PHASE_TWO_FAILED, E.PHASE_TWO_DONE])
def test_decided_like_is_only_about_decisions(status, event):
    assert decided_like(status, event) is False


def test_begin_is_never_decided_like():
    assert not decided_like(S.BEGIN, E.COMMIT)
    assert not decided_like(S.BEGIN, E.ROLLBACK)


# --- random event sequences ---------------------------------------------------------------------


def _run(events: list[Event]) -> list[GlobalStatus]:
    """Apply events from Begin, skipping the illegal ones (which must change nothing)."""
    path = [S.BEGIN]
    for event in events:
        current = path[-1]
        try:
            nxt = transition(current, event)
        except IllegalTransition as exc:
            assert exc.status is current and exc.event is event
            continue
        assert not current.finished, f"{current} left by {event}"
        path.append(nxt)
    return path


@given(st.lists(st.sampled_from(list(Event)), max_size=40))
def test_random_sequences_never_leave_a_finished_status(events):
    path = _run(events)
    for i, status in enumerate(path):
        if status.finished:
            assert path[i:] == [status], path


_ROUTES = {
    S.COMMITTED: {S.COMMITTING, S.COMMIT_RETRYING},
    S.ROLLBACKED: {S.ROLLBACKING, S.ROLLBACK_RETRYING},
    S.TIMEOUT_ROLLBACKED: {S.TIMEOUT_ROLLBACKING, S.TIMEOUT_ROLLBACK_RETRYING},
}


@given(st.lists(st.sampled_from(list(Event)), max_size=40))
def test_each_outcome_is_reached_only_through_its_own_phase_two(events):
    path = _run(events)
    final = path[-1]
    if final.finished:
        # Begin, then one decision, then only that decision's phase-two statuses
        assert path[0] is S.BEGIN
        middle = path[1:-1]
        assert middle, path
        assert set(middle) <= _ROUTES[final], path
        assert middle[0] in (S.COMMITTING, S.ROLLBACKING, S.TIMEOUT_ROLLBACKING), path
    # a path never mixes directions
    assert not (any(s.committing for s in path) and any(s.rolling_back for s in path)), path
    # Begin appears once, first
    assert path.count(S.BEGIN) == 1


@given(st.lists(st.sampled_from(list(Event)), max_size=40))
def test_a_decided_status_is_decided_like_its_decision(events):
    path = _run(events)
    for status in path[1:]:
        decision = E.COMMIT if status in COMMIT_LIKE else E.ROLLBACK
        assert decided_like(status, decision)
        other = E.ROLLBACK if decision is E.COMMIT else E.COMMIT
        assert not decided_like(status, other)
