"""The fence's decision table (Seata's semantics, plus tries in flight), exhaustively."""

import pytest

from sidecar.txn.fence import FINAL_STATES, Action, FenceState, Phase, decide

S = FenceState
A = Action

# (phase, state, try running?, action, next state)
CASES = [
    # try: recorded as running before it is forwarded
    (Phase.TRY, None, False, A.FORWARD, S.TRYING),
    (Phase.TRY, S.TRIED, False, A.FORWARD, S.TRYING),  # a retried try
    (Phase.TRY, S.TRYING, True, A.FORWARD, S.TRYING),
    (Phase.TRY, S.TRYING, False, A.FORWARD, S.TRYING),
    (Phase.TRY, S.CANCELLED, False, A.REFUSE, None),  # suspension
    (Phase.TRY, S.EMPTY_CANCELLED, False, A.REFUSE, None),  # suspension after empty rollback
    (Phase.TRY, S.CONFIRMED, False, A.REFUSE, None),
    # the try's end: TRYING becomes TRIED, whether it ran out or was answered; a branch
    # decided meanwhile (its deadline passed) keeps its decision
    (Phase.TRY_END, S.TRYING, True, A.RECORD_ONLY, S.TRIED),
    (Phase.TRY_END, S.TRYING, False, A.RECORD_ONLY, S.TRIED),
    (Phase.TRY_END, None, False, A.DONE, None),
    (Phase.TRY_END, S.TRIED, False, A.DONE, None),
    (Phase.TRY_END, S.CONFIRMED, False, A.DONE, None),
    (Phase.TRY_END, S.CANCELLED, False, A.DONE, None),
    (Phase.TRY_END, S.EMPTY_CANCELLED, False, A.DONE, None),
    # ...or UNDELIVERED when it never reached the app
    (Phase.TRY_UNDELIVERED, S.TRYING, True, A.RECORD_ONLY, S.UNDELIVERED),
    (Phase.TRY_UNDELIVERED, S.TRYING, False, A.RECORD_ONLY, S.UNDELIVERED),
    (Phase.TRY_UNDELIVERED, None, False, A.DONE, None),
    (Phase.TRY_UNDELIVERED, S.TRIED, False, A.DONE, None),
    (Phase.TRY_UNDELIVERED, S.UNDELIVERED, False, A.DONE, None),
    (Phase.TRY_UNDELIVERED, S.CONFIRMED, False, A.DONE, None),
    (Phase.TRY_UNDELIVERED, S.CANCELLED, False, A.DONE, None),
    (Phase.TRY_UNDELIVERED, S.EMPTY_CANCELLED, False, A.DONE, None),
    (Phase.TRY_END, S.UNDELIVERED, False, A.DONE, None),
    (Phase.TRY, S.UNDELIVERED, False, A.FORWARD, S.TRYING),
    # confirm
    (Phase.CONFIRM, S.TRYING, True, A.WAIT, None),  # never while the try runs
    (Phase.CONFIRM, S.TRYING, False, A.FORWARD, S.CONFIRMED),  # past its deadline
    (Phase.CONFIRM, S.TRIED, False, A.FORWARD, S.CONFIRMED),
    (Phase.CONFIRM, S.CONFIRMED, False, A.DONE, None),  # repeated: answered from the fence
    (Phase.CONFIRM, S.CANCELLED, False, A.REFUSE, None),
    (Phase.CONFIRM, S.EMPTY_CANCELLED, False, A.REFUSE, None),
    (Phase.CONFIRM, None, False, A.RETRY_LATER, None),
    (Phase.CONFIRM, S.UNDELIVERED, False, A.REFUSE, None),  # its try cannot have succeeded
    # cancel
    (Phase.CANCEL, S.TRYING, True, A.WAIT, None),  # never overtakes the try
    (Phase.CANCEL, S.TRYING, False, A.FORWARD, S.CANCELLED),  # unknown outcome: cancel it
    (Phase.CANCEL, S.TRIED, False, A.FORWARD, S.CANCELLED),
    (Phase.CANCEL, S.CANCELLED, False, A.DONE, None),  # repeated
    (Phase.CANCEL, S.EMPTY_CANCELLED, False, A.DONE, None),
    (Phase.CANCEL, None, False, A.RECORD_ONLY, S.EMPTY_CANCELLED),  # empty rollback
    (Phase.CANCEL, S.CONFIRMED, False, A.REFUSE, None),
    # a try that never reached the app: nothing to undo there
    (Phase.CANCEL, S.UNDELIVERED, False, A.RECORD_ONLY, S.EMPTY_CANCELLED),
]


@pytest.mark.parametrize(("phase", "state", "running", "action", "next_state"), CASES)
def test_decision_table(phase, state, running, action, next_state) -> None:
    d = decide(phase, state, running)
    assert (d.action, d.next_state) == (action, next_state)
    assert d.reason


def test_every_phase_and_state_is_decided() -> None:
    covered = {(p, s) for p, s, _, _, _ in CASES}
    for phase in Phase:
        for state in [None, *FenceState]:
            assert (phase, state) in covered


def test_running_only_matters_for_a_trying_row() -> None:
    for phase in Phase:
        for state in [None, *FenceState]:
            if state is not S.TRYING:
                assert decide(phase, state, True) == decide(phase, state, False)


def test_the_app_is_called_at_most_once_per_phase() -> None:
    # after a forwarded confirm or cancel has been recorded, no further call of either
    # phase is ever forwarded to the app
    for first in (Phase.CONFIRM, Phase.CANCEL):
        state = decide(first, S.TRIED).next_state
        for again in (Phase.CONFIRM, Phase.CANCEL, Phase.TRY):
            assert decide(again, state).action is not A.FORWARD


def test_phase_two_never_reaches_the_app_while_a_try_runs() -> None:
    for phase in (Phase.CONFIRM, Phase.CANCEL):
        assert decide(phase, S.TRYING, True).action is A.WAIT


def test_final_states_are_never_followed_by_a_call_to_the_app() -> None:
    # retention removes final rows: the app must never be called for one again, and every
    # state phase two may still change is not final
    for state in FenceState:
        forwards = any(
            decide(p, state, r).action is A.FORWARD
            for p in (Phase.CONFIRM, Phase.CANCEL)
            for r in (False, True)
        )
        changes = any(
            decide(p, state, r).next_state not in (None, state)
            for p in (Phase.CONFIRM, Phase.CANCEL)
            for r in (False, True)
        )
        assert (state in FINAL_STATES) is not (forwards or changes), state
