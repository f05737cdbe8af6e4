"""The fence: exactly-once phase two for TCC/Saga branches, with Seata's semantics, and phase
two never overtaking a try that is still running at the app.

Rules: pure. One fence row per branch (xid, branch id) records how far it got; `decide` says
what to do with a try, the end of a try, a confirm or a cancel given the row (or its absence),
and what the row becomes. The caller (txn/branches.py) holds a per-branch lock around
decide → act → record, so a confirm and a cancel racing for one branch cannot both act: the
second sees the first's outcome.

A try is recorded TRYING (with its start and deadline) before it is forwarded, and TRIED once
it ended. While it runs, a confirm or cancel WAITs: a cancel passed to the app while the try
is still working would find nothing to cancel, and the reservation the try then makes would
never be released. A TRYING row whose try is no longer running (it ended but the TRIED write
was lost, or its deadline passed, e.g. across a restart) is a try of unknown outcome and is
treated as TRIED: a cancel goes to the app.

    try      no row / TRIED → TRYING, forward   CANCELLED / EMPTY_CANCELLED → refuse (suspension)
             (a retried try: the app's own idempotency covers it)   CONFIRMED → refuse
    try end  TRYING → TRIED, or UNDELIVERED when it never reached the app
             anything else → left as it is
    confirm  TRYING, running → wait             TRIED → call the app → CONFIRMED
             CONFIRMED → done, app not called   no row → retry later (a confirm follows a try)
    cancel   TRYING, running → wait             TRIED → call the app → CANCELLED
             CANCELLED / EMPTY_CANCELLED → done, not called
             no row / UNDELIVERED → EMPTY_CANCELLED, done, app not called ("empty rollback")
             CONFIRMED → refuse: the branch was committed
    (confirm of an UNDELIVERED try → refuse: the coordinator cannot have been told it succeeded)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class FenceState(StrEnum):
    TRYING = "trying"  # the try was forwarded and has not ended yet
    TRIED = "tried"
    UNDELIVERED = "undelivered"  # the try never reached the app: nothing there to undo
    CONFIRMED = "confirmed"
    CANCELLED = "cancelled"
    EMPTY_CANCELLED = "empty_cancelled"


#: states after which the app is never called for the branch again: a row in one of them
#: only matters for repeats and suspension, so retention may remove it once it is old
FINAL_STATES: Final = frozenset(
    {FenceState.CONFIRMED, FenceState.CANCELLED, FenceState.EMPTY_CANCELLED}
)


class Phase(StrEnum):
    TRY = "try"
    TRY_END = "try_end"  # the try's exchange with the app ended
    TRY_UNDELIVERED = "try_undelivered"  # the try ended without ever reaching the app
    CONFIRM = "confirm"
    CANCEL = "cancel"


class Action(StrEnum):
    FORWARD = "forward"  # call the app (try, confirm or cancel)
    DONE = "done"  # already done: answer success without calling the app
    RECORD_ONLY = "record_only"  # write the new state, answer success, don't call the app
    REFUSE = "refuse"  # never call the app; answer an error
    RETRY_LATER = "retry_later"  # not now: the coordinator should retry
    WAIT = "wait"  # the branch's try is running: wait for it to end, then decide again


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    #: the state to record once the action succeeded (None: leave the row as it is)
    next_state: FenceState | None
    reason: str


#: the phases that end a try: they record how it ended, whether or not it still runs
_ENDS: Final = frozenset({Phase.TRY_END, Phase.TRY_UNDELIVERED})
_S = FenceState
_A = Action
_D = Decision

#: (phase, state) → decision; TRYING here means "and the try is still running"
_TABLE: Final[dict[tuple[Phase, FenceState | None], Decision]] = {
    (Phase.TRY, None): _D(_A.FORWARD, _S.TRYING, "try"),
    (Phase.TRY, _S.TRYING): _D(_A.FORWARD, _S.TRYING, "try while another is running"),
    (Phase.TRY, _S.TRIED): _D(_A.FORWARD, _S.TRYING, "retried try"),
    (Phase.TRY, _S.UNDELIVERED): _D(_A.FORWARD, _S.TRYING, "retried try"),
    (Phase.TRY, _S.CONFIRMED): _D(_A.REFUSE, None, "try after its confirm"),
    (Phase.TRY, _S.CANCELLED): _D(_A.REFUSE, None, "try after its cancel (suspension)"),
    (Phase.TRY, _S.EMPTY_CANCELLED): _D(_A.REFUSE, None, "try after its cancel (suspension)"),
    (Phase.TRY_END, None): _D(_A.DONE, None, "try ended; its row is gone"),
    (Phase.TRY_END, _S.TRYING): _D(_A.RECORD_ONLY, _S.TRIED, "try ended"),
    (Phase.TRY_END, _S.TRIED): _D(_A.DONE, None, "try ended; already recorded"),
    (Phase.TRY_END, _S.CONFIRMED): _D(_A.DONE, None, "try ended after its confirm"),
    (Phase.TRY_END, _S.CANCELLED): _D(_A.DONE, None, "try ended after its cancel"),
    (Phase.TRY_END, _S.EMPTY_CANCELLED): _D(_A.DONE, None, "try ended after its cancel"),
    (Phase.TRY_END, _S.UNDELIVERED): _D(_A.DONE, None, "try ended; already recorded"),
    (Phase.TRY_UNDELIVERED, None): _D(_A.DONE, None, "try ended; its row is gone"),
    (Phase.TRY_UNDELIVERED, _S.TRYING): _D(_A.RECORD_ONLY, _S.UNDELIVERED, "try undelivered"),
    (Phase.TRY_UNDELIVERED, _S.TRIED): _D(_A.DONE, None, "try ended; already recorded"),
    (Phase.TRY_UNDELIVERED, _S.UNDELIVERED): _D(_A.DONE, None, "try ended; already recorded"),
    (Phase.TRY_UNDELIVERED, _S.CONFIRMED): _D(_A.DONE, None, "try ended after its confirm"),
    (Phase.TRY_UNDELIVERED, _S.CANCELLED): _D(_A.DONE, None, "try ended after its cancel"),
    (Phase.TRY_UNDELIVERED, _S.EMPTY_CANCELLED): _D(_A.DONE, None, "try ended after its cancel"),
    (Phase.CONFIRM, None): _D(_A.RETRY_LATER, None, "confirm before its try was recorded"),
    (Phase.CONFIRM, _S.TRYING): _D(_A.WAIT, None, "confirm while its try is running"),
    (Phase.CONFIRM, _S.TRIED): _D(_A.FORWARD, _S.CONFIRMED, "confirm"),
    (Phase.CONFIRM, _S.UNDELIVERED): _D(
        _A.REFUSE, None, "confirm of a try that never reached the app"
    ),
    (Phase.CONFIRM, _S.CONFIRMED): _D(_A.DONE, None, "repeated confirm"),
    (Phase.CONFIRM, _S.CANCELLED): _D(_A.REFUSE, None, "confirm after cancel"),
    (Phase.CONFIRM, _S.EMPTY_CANCELLED): _D(_A.REFUSE, None, "confirm after cancel"),
    (Phase.CANCEL, None): _D(_A.RECORD_ONLY, _S.EMPTY_CANCELLED, "cancel without try"),
    (Phase.CANCEL, _S.TRYING): _D(_A.WAIT, None, "cancel while its try is running"),
    (Phase.CANCEL, _S.TRIED): _D(_A.FORWARD, _S.CANCELLED, "cancel"),
    (Phase.CANCEL, _S.UNDELIVERED): _D(
        _A.RECORD_ONLY, _S.EMPTY_CANCELLED, "cancel of a try that never reached the app"
    ),
    (Phase.CANCEL, _S.CONFIRMED): _D(_A.REFUSE, None, "cancel after confirm"),
    (Phase.CANCEL, _S.CANCELLED): _D(_A.DONE, None, "repeated cancel"),
    (Phase.CANCEL, _S.EMPTY_CANCELLED): _D(_A.DONE, None, "repeated cancel"),
}


def decide(phase: Phase, state: FenceState | None, try_running: bool = False) -> Decision:
    """What to do with `phase` given the branch's fence `state`. `try_running` says whether
    a TRYING row's try is still running (in this process, within its deadline); a TRYING row
    whose try is not is decided as TRIED (outcome unknown)."""
    if state is FenceState.TRYING and not try_running and phase not in _ENDS:
        state = FenceState.TRIED
    return _TABLE[(phase, state)]
