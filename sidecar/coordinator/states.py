"""Global and branch statuses, and the global state machine as a table (docs/protocol.md).

Rules: pure. A transition is looked up in `TRANSITIONS`; an event that has no entry for the
current status raises `IllegalTransition` naming both, and the caller's state is unchanged
(nothing here mutates anything). Status names are Seata's.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class GlobalStatus(StrEnum):
    BEGIN = "Begin"
    COMMITTING = "Committing"
    COMMIT_RETRYING = "CommitRetrying"
    ROLLBACKING = "Rollbacking"
    ROLLBACK_RETRYING = "RollbackRetrying"
    TIMEOUT_ROLLBACKING = "TimeoutRollbacking"
    TIMEOUT_ROLLBACK_RETRYING = "TimeoutRollbackRetrying"
    COMMITTED = "Committed"
    ROLLBACKED = "Rollbacked"
    TIMEOUT_ROLLBACKED = "TimeoutRollbacked"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def committing(self) -> bool:
        """Phase two runs commit (as opposed to rollback)."""
        return self in _COMMITTING

    @property
    def rolling_back(self) -> bool:
        return self in _ROLLING_BACK


_FINISHED: Final = frozenset(
    {GlobalStatus.COMMITTED, GlobalStatus.ROLLBACKED, GlobalStatus.TIMEOUT_ROLLBACKED}
)
_COMMITTING: Final = frozenset({GlobalStatus.COMMITTING, GlobalStatus.COMMIT_RETRYING})
_ROLLING_BACK: Final = frozenset(
    {
        GlobalStatus.ROLLBACKING,
        GlobalStatus.ROLLBACK_RETRYING,
        GlobalStatus.TIMEOUT_ROLLBACKING,
        GlobalStatus.TIMEOUT_ROLLBACK_RETRYING,
    }
)


FINAL_STATUS_NAMES: Final = frozenset(s.value for s in _FINISHED)


def is_final(status: str) -> bool:
    """A status as a string (as answered over HTTP; "Unknown" included) is a final one."""
    return status in FINAL_STATUS_NAMES


class BranchStatus(StrEnum):
    REGISTERED = "Registered"
    PHASE_ONE_DONE = "PhaseOne_Done"
    PHASE_ONE_FAILED = "PhaseOne_Failed"
    PHASE_TWO_COMMITTED = "PhaseTwo_Committed"
    PHASE_TWO_ROLLBACKED = "PhaseTwo_Rollbacked"
    PHASE_TWO_COMMIT_RETRYABLE = "PhaseTwo_CommitFailed_Retryable"
    PHASE_TWO_ROLLBACK_RETRYABLE = "PhaseTwo_RollbackFailed_Retryable"

    @property
    def phase_two_done(self) -> bool:
        return self in _PHASE_TWO_DONE


_PHASE_TWO_DONE: Final = frozenset(
    {BranchStatus.PHASE_TWO_COMMITTED, BranchStatus.PHASE_TWO_ROLLBACKED}
)


class BranchType(StrEnum):
    TCC = "TCC"
    SAGA = "SAGA"


class Event(StrEnum):
    COMMIT = "commit"  # the TM asks to commit
    ROLLBACK = "rollback"  # the TM asks to roll back (or a branch's phase one failed)
    TIMEOUT = "timeout"  # the transaction's timeout passed while it was still Begin
    PHASE_TWO_FAILED = "phase_two_failed"  # some branch must be retried
    PHASE_TWO_DONE = "phase_two_done"  # every branch finished phase two


S = GlobalStatus
E = Event

#: (status, event) → next status
TRANSITIONS: Final[dict[tuple[GlobalStatus, Event], GlobalStatus]] = {
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


class IllegalTransition(Exception):
    def __init__(self, status: GlobalStatus, event: Event) -> None:
        super().__init__(f"event {event.value!r} is not allowed in status {status.value!r}")
        self.status = status
        self.event = event


def transition(status: GlobalStatus, event: Event) -> GlobalStatus:
    try:
        return TRANSITIONS[(status, event)]
    except KeyError:
        raise IllegalTransition(status, event) from None


def decided_like(status: GlobalStatus, event: Event) -> bool:
    """A repeated commit (or rollback) of a transaction already going that way: answered
    with its current status, not an error, so TM retries are harmless."""
    if event is Event.COMMIT:
        return status.committing or status is GlobalStatus.COMMITTED
    if event is Event.ROLLBACK:
        return status.rolling_back or status in (
            GlobalStatus.ROLLBACKED,
            GlobalStatus.TIMEOUT_ROLLBACKED,
        )
    return False
