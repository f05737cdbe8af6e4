"""The fence's decision table (Seata's semantics), exhaustively."""

import pytest

from sidecar.txn.fence import Action, FenceState, Phase, decide

S = FenceState
A = Action

CASES = [
    # try
    (Phase.TRY, None, A.FORWARD, S.TRIED),
    (Phase.TRY, S.TRIED, A.FORWARD, S.TRIED),
    (Phase.TRY, S.CANCELLED, A.REFUSE, None),  # suspension
    (Phase.TRY, S.EMPTY_CANCELLED, A.REFUSE, None),  # suspension after an empty rollback
    (Phase.TRY, S.CONFIRMED, A.REFUSE, None),
    # confirm
    (Phase.CONFIRM, S.TRIED, A.FORWARD, S.CONFIRMED),
    (Phase.CONFIRM, S.CONFIRMED, A.DONE, None),  # repeated: answered from the fence
    (Phase.CONFIRM, S.CANCELLED, A.REFUSE, None),
    (Phase.CONFIRM, S.EMPTY_CANCELLED, A.REFUSE, None),
    (Phase.CONFIRM, None, A.RETRY_LATER, None),
    # cancel
    (Phase.CANCEL, S.TRIED, A.FORWARD, S.CANCELLED),
    (Phase.CANCEL, S.CANCELLED, A.DONE, None),  # repeated
    (Phase.CANCEL, S.EMPTY_CANCELLED, A.DONE, None),
    (Phase.CANCEL, None, A.RECORD_ONLY, S.EMPTY_CANCELLED),  # empty rollback: app not called
    (Phase.CANCEL, S.CONFIRMED, A.REFUSE, None),
]


@pytest.mark.parametrize(("phase", "state", "action", "next_state"), CASES)
def test_decision_table(phase, state, action, next_state) -> None:
    d = decide(phase, state)
    assert (d.action, d.next_state) == (action, next_state)
    assert d.reason


def test_every_phase_and_state_is_decided() -> None:
    covered = {(p, s) for p, s, _, _ in CASES}
    for phase in Phase:
        for state in [None, *FenceState]:
            assert (phase, state) in covered


def test_the_app_is_called_at_most_once_per_phase() -> None:
    # after a forwarded confirm or cancel has been recorded, no further call of either
    # phase is ever forwarded to the app
    for first in (Phase.CONFIRM, Phase.CANCEL):
        state = decide(first, S.TRIED).next_state
        for again in (Phase.CONFIRM, Phase.CANCEL, Phase.TRY):
            assert decide(again, state).action is not A.FORWARD
