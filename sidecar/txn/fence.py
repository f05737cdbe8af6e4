"""The fence: exactly-once phase two for TCC/Saga branches, with Seata's semantics.

Rules: pure. One fence row per branch (xid, branch id) records how far it got; `decide` says
what to do with a try, confirm or cancel given the row (or its absence), and what the row
becomes. The caller (txn/branches.py) holds a per-branch lock around decide → act → record,
so a confirm and a cancel racing for one branch cannot both act: the second sees the first's
outcome.

    try      no row → TRIED, forward         CANCELLED / EMPTY_CANCELLED → refuse (suspension)
             TRIED → forward again (a retried try; the app's own idempotency covers it)
    confirm  TRIED → call the app → CONFIRMED   CONFIRMED → answer done, app not called
             no row → retry later (a confirm can only follow a try that reported done)
    cancel   TRIED → call the app → CANCELLED   CANCELLED / EMPTY_CANCELLED → done, not called
             no row → EMPTY_CANCELLED, done, app not called ("empty rollback")
             CONFIRMED → refuse: the branch was committed
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FenceState(StrEnum):
    TRIED = "tried"
    CONFIRMED = "confirmed"
    CANCELLED = "cancelled"
    EMPTY_CANCELLED = "empty_cancelled"


class Phase(StrEnum):
    TRY = "try"
    CONFIRM = "confirm"
    CANCEL = "cancel"


class Action(StrEnum):
    FORWARD = "forward"  # call the app (try, confirm or cancel)
    DONE = "done"  # already done: answer success without calling the app
    RECORD_ONLY = "record_only"  # write the new state, answer success, don't call the app
    REFUSE = "refuse"  # never call the app; answer an error
    RETRY_LATER = "retry_later"  # not now: the coordinator should retry


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    #: the state to record once the action succeeded (None: leave the row as it is)
    next_state: FenceState | None
    reason: str


_CANCELLED = (FenceState.CANCELLED, FenceState.EMPTY_CANCELLED)


def decide(phase: Phase, state: FenceState | None) -> Decision:
    if phase is Phase.TRY:
        if state in _CANCELLED:
            return Decision(Action.REFUSE, None, "try after its cancel (suspension)")
        if state is FenceState.CONFIRMED:
            return Decision(Action.REFUSE, None, "try after its confirm")
        return Decision(Action.FORWARD, FenceState.TRIED, "try")
    if phase is Phase.CONFIRM:
        if state is FenceState.CONFIRMED:
            return Decision(Action.DONE, None, "repeated confirm")
        if state is FenceState.TRIED:
            return Decision(Action.FORWARD, FenceState.CONFIRMED, "confirm")
        if state in _CANCELLED:
            return Decision(Action.REFUSE, None, "confirm after cancel")
        return Decision(Action.RETRY_LATER, None, "confirm before its try was recorded")
    # cancel
    if state in _CANCELLED:
        return Decision(Action.DONE, None, "repeated cancel")
    if state is FenceState.TRIED:
        return Decision(Action.FORWARD, FenceState.CANCELLED, "cancel")
    if state is FenceState.CONFIRMED:
        return Decision(Action.REFUSE, None, "cancel after confirm")
    return Decision(Action.RECORD_ONLY, FenceState.EMPTY_CANCELLED, "cancel without try")
