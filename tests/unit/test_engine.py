"""The transaction engine (sidecar/coordinator/engine.py) with its I/O faked: a MemoryJournal
that records (and can refuse) writes, a scripted BranchCaller that records every call in
order, an injected wall clock and a fixed jitter. Timeouts use short real timers and are
awaited by polling with bounds at least ten times the timeout under test."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import PhaseTwoRetry
from sidecar.coordinator.engine import Engine, backoff
from sidecar.coordinator.journal import MemoryJournal, SqliteJournal
from sidecar.coordinator.records import BranchRecord, GlobalRecord, Journal
from sidecar.coordinator.states import BranchStatus, BranchType, GlobalStatus
from sidecar.errors import (
    BranchNotFound,
    IdempotencyConflict,
    InvalidRequest,
    JournalUnavailable,
    TransactionNotActive,
    TransactionNotFound,
)

S = GlobalStatus
B = BranchStatus
T0 = 1_700_000_000_000
OWNER = "10.0.0.9:8091"
POLICY = PhaseTwoRetry(initial="10ms", max="40ms", max_attempts=3)


# --- fakes ----------------------------------------------------------------------------------


class Clock:
    """The engine's wall clock (ms). Timers still run on the loop's clock: the delay the
    engine arms is deadline - now()."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


Answer = str | None | BaseException


class FakeCaller:
    """Scripted phase-two answers per resource id (None: done; a string: why not; an
    exception: raised). Unscripted calls succeed. A resource can be held on a gate."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        #: (resource, commit, ok) as each call returns
        self.results: list[tuple[str, bool, bool]] = []
        self.times: dict[str, list[float]] = {}
        self.script: dict[str, list[Answer]] = {}
        self.default: dict[str, Answer] = {}
        self.hold: dict[str, asyncio.Event] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    async def phase_two(self, branch: BranchRecord, commit: bool) -> str | None:
        rid = branch.resource_id
        self.calls.append((rid, commit))
        self.times.setdefault(rid, []).append(asyncio.get_running_loop().time())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            gate = self.hold.get(rid)
            if gate is not None:
                await gate.wait()
            else:
                await asyncio.sleep(0)  # a real suspension point, like an HTTP call
            answers = self.script.get(rid)
            answer = answers.pop(0) if answers else self.default.get(rid)
        finally:
            self.in_flight -= 1
        self.results.append((rid, commit, answer is None))
        if isinstance(answer, BaseException):
            raise answer
        return answer


class Events:
    """What the engine reported (EngineEvents)."""

    def __init__(self) -> None:
        self.done: list[GlobalRecord] = []
        self.stuck: list[BranchRecord] = []
        self.calls: list[bool] = []

    def finished(self, record: GlobalRecord) -> None:
        self.done.append(record)

    def branch_stuck(self, branch: BranchRecord) -> None:
        self.stuck.append(branch)

    def phase_two_call(self, ok: bool) -> None:
        self.calls.append(ok)


class RecordingJournal(MemoryJournal):
    """A MemoryJournal that keeps the history of global statuses written, and refuses
    writes while `fail` is set (or for the next `fail_next` writes)."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[GlobalStatus]] = {}
        self.fail = False
        self.fail_next = 0
        #: only refuse writes that touch a branch (phase-two bookkeeping)
        self.fail_branch_writes = False
        #: writes refused so far
        self.failures = 0

    async def write(
        self,
        globals_: Sequence[GlobalRecord] = (),
        branches: Sequence[BranchRecord] = (),
    ) -> None:
        await asyncio.sleep(0)  # a real journal suspends (its writer thread commits)
        if self.fail or (self.fail_branch_writes and branches) or self.fail_next:
            self.fail_next = max(0, self.fail_next - 1)
            self.failures += 1
            raise JournalUnavailable("journal write failed: disk I/O error (test)")
        await super().write(globals_, branches)
        for g in globals_:
            self.history.setdefault(g.xid, []).append(g.status)


@dataclass
class Rig:
    engine: Engine
    journal: Any
    caller: FakeCaller
    events: Events
    clock: Clock


async def eventually(pred: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll until `pred()` holds (returns as soon as it does)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.002)


async def status_of(engine: Engine, xid: str) -> GlobalStatus:
    return (await engine.get(xid))[0].status


async def wait_status(
    engine: Engine, xid: str, want: set[GlobalStatus] | GlobalStatus, timeout: float = 2.0
) -> GlobalRecord:
    wanted = {want} if isinstance(want, GlobalStatus) else want
    deadline = time.monotonic() + timeout
    while True:
        record = (await engine.get(xid))[0]
        if record.status in wanted:
            return record
        if time.monotonic() > deadline:
            raise AssertionError(f"{xid} is {record.status}, not {wanted}, after {timeout}s")
        await asyncio.sleep(0.002)


Make = Callable[..., Any]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """`await make(journal=None, clock=None, caller=None)` → a started Rig; all are stopped
    and their journals closed at the end."""
    rigs: list[Rig] = []

    async def build(
        journal: Journal | None = None,
        clock: Clock | None = None,
        caller: FakeCaller | None = None,
        policy: PhaseTwoRetry = POLICY,
        start: bool = True,
    ) -> Rig:
        journal = journal or RecordingJournal()
        await journal.open()
        clock = clock or Clock()
        caller = caller or FakeCaller()
        events = Events()
        engine = Engine(
            journal,
            caller,
            owner_host="10.0.0.9",
            owner_port=8091,
            policy=policy,
            default_timeout_ms=60_000,
            max_timeout_ms=600_000,
            clock_ms=clock,
            events=events,
            rand=lambda: 0.5,
        )
        rig = Rig(engine, journal, caller, events, clock)
        rigs.append(rig)
        if start:
            await engine.start()
        return rig

    yield build
    for rig in rigs:
        await rig.engine.stop(0)
        for gate in rig.caller.hold.values():
            gate.set()
        await rig.journal.close()


async def with_branches(
    rig: Rig, *resources: str, timeout_ms: int = 60_000, branch_type: BranchType = BranchType.TCC
) -> tuple[str, list[BranchRecord]]:
    """Begin, then register and report PhaseOne_Done for each resource, in order."""
    record = await rig.engine.begin("order", timeout_ms)
    branches = []
    for rid in resources:
        b = await rig.engine.register(
            record.xid, branch_type, rid, f"http://10.0.0.2:17020/gts/{rid}", b'{"n":1}'
        )
        await rig.engine.report(record.xid, b.branch_id, B.PHASE_ONE_DONE)
        branches.append(b)
    return record.xid, branches


# --- backoff (pure) ---------------------------------------------------------------------------


def test_backoff_grows_by_the_multiplier_and_is_capped():
    assert [backoff(POLICY, n, lambda: 0.5) for n in (1, 2, 3, 4, 9)] == pytest.approx(
        [0.01, 0.02, 0.04, 0.04, 0.04]
    )
    assert backoff(POLICY, 0, lambda: 0.5) == pytest.approx(0.01)


@given(st.integers(1, 30), st.floats(0.0, 1.0))
def test_backoff_jitter_stays_within_its_share(attempt, r):
    base = min(0.04, 0.01 * 2 ** (attempt - 1))
    delay = backoff(POLICY, attempt, lambda: r)
    assert base * 0.8 - 1e-12 <= delay <= base * 1.2 + 1e-12


# --- begin --------------------------------------------------------------------------------------


async def test_begin_journals_a_begin_record(make):
    rig = await make()
    record = await rig.engine.begin("create-order", 30_000)
    assert record.status is S.BEGIN
    assert record.xid.startswith(OWNER + ":")
    assert record.name == "create-order"
    assert (record.begin_ms, record.timeout_ms, record.deadline_ms) == (T0, 30_000, T0 + 30_000)
    assert await rig.journal.find(record.xid) == (record, [])
    assert rig.journal.history[record.xid] == [S.BEGIN]
    assert rig.engine.active == 1
    assert await rig.engine.get(record.xid) == (record, [])


async def test_begin_without_timeout_uses_the_default_and_bounds_are_checked(make):
    rig = await make()
    assert (await rig.engine.begin("t")).timeout_ms == 60_000
    for bad in (0, -1, 600_001):
        with pytest.raises(InvalidRequest, match="timeoutMs"):
            await rig.engine.begin("t", bad)
    assert rig.engine.active == 1


async def test_xids_are_unique(make):
    rig = await make()
    xids = {(await rig.engine.begin("t")).xid for _ in range(200)}
    assert len(xids) == 200


# --- commit and rollback ------------------------------------------------------------------------


async def test_commit_without_branches_writes_once_and_finishes(make):
    rig = await make()
    xid = (await rig.engine.begin("t")).xid
    writes = rig.journal.writes
    record = await rig.engine.commit(xid)
    assert record.status is S.COMMITTED
    assert rig.journal.writes == writes + 1
    assert rig.journal.history[xid] == [S.BEGIN, S.COMMITTED]
    assert rig.caller.calls == []
    assert rig.engine.active == 0
    assert [r.xid for r in rig.events.done] == [xid]
    assert (await rig.journal.find(xid))[0].status is S.COMMITTED


async def test_rollback_without_branches_writes_once_and_finishes(make):
    rig = await make()
    xid = (await rig.engine.begin("t")).xid
    writes = rig.journal.writes
    assert (await rig.engine.rollback(xid)).status is S.ROLLBACKED
    assert rig.journal.writes == writes + 1
    assert rig.journal.history[xid] == [S.BEGIN, S.ROLLBACKED]
    assert rig.engine.active == 0


async def test_commit_confirms_every_branch_once_concurrently(make):
    rig = await make()
    gate = asyncio.Event()
    for rid in "abc":
        rig.caller.hold[rid] = gate
    xid, branches = await with_branches(rig, "a", "b", "c")
    record = await rig.engine.commit(xid)
    assert record.status is S.COMMITTING
    # all three confirms are in flight together
    await eventually(lambda: rig.caller.in_flight == 3)
    gate.set()
    await wait_status(rig.engine, xid, S.COMMITTED)
    assert sorted(rig.caller.calls) == [("a", True), ("b", True), ("c", True)]
    assert rig.caller.max_in_flight == 3
    record, stored = await rig.engine.get(xid)
    assert [b.status for b in stored] == [B.PHASE_TWO_COMMITTED] * 3
    assert [b.attempts for b in stored] == [1, 1, 1]
    assert rig.journal.history[xid] == [S.BEGIN, S.COMMITTING, S.COMMITTED]
    assert rig.events.calls == [True, True, True]
    assert [r.status for r in rig.events.done] == [S.COMMITTED]
    assert rig.engine.active == 0
    journalled = await rig.journal.find(xid)
    assert journalled == (record, stored)


async def test_the_last_confirm_shares_its_write_with_the_outcome(make):
    # decision, then one write per confirm, the last one carrying Committed too: with one
    # branch that is two writes after the begin and the registration, not three
    rig = await make()
    xid, _ = await with_branches(rig, "a")
    writes = rig.journal.writes
    assert (await rig.engine.commit(xid, wait=2.0)).status is S.COMMITTED
    assert rig.journal.writes == writes + 2
    assert rig.journal.history[xid] == [S.BEGIN, S.COMMITTING, S.COMMITTED]
    _, (stored,) = await rig.journal.find(xid)
    assert stored.status is B.PHASE_TWO_COMMITTED


async def test_commit_with_wait_returns_the_outcome(make):
    rig = await make()
    xid, _ = await with_branches(rig, "a", "b")
    assert (await rig.engine.commit(xid, wait=2.0)).status is S.COMMITTED


async def test_rollback_cancels_in_reverse_registration_order_one_at_a_time(make):
    rig = await make()
    xid, _ = await with_branches(rig, "a", "b", "c", "d")
    record = await rig.engine.rollback(xid, wait=2.0)
    assert record.status is S.ROLLBACKED
    assert rig.caller.calls == [("d", False), ("c", False), ("b", False), ("a", False)]
    assert rig.caller.max_in_flight == 1
    _, stored = await rig.engine.get(xid)
    assert {b.status for b in stored} == {B.PHASE_TWO_ROLLBACKED}
    assert rig.journal.history[xid] == [S.BEGIN, S.ROLLBACKING, S.ROLLBACKED]


async def test_commit_with_a_failed_phase_one_rolls_back_instead(make):
    rig = await make()
    xid, branches = await with_branches(rig, "a", "b", "c")
    await rig.engine.report(xid, branches[1].branch_id, B.PHASE_ONE_FAILED)
    record = await rig.engine.commit(xid, wait=2.0)
    assert record.status is S.ROLLBACKED
    assert rig.caller.calls == [("c", False), ("b", False), ("a", False)]
    assert rig.journal.history[xid] == [S.BEGIN, S.ROLLBACKING, S.ROLLBACKED]


async def test_commit_with_a_failed_phase_one_and_no_other_branch(make):
    rig = await make()
    xid, (b,) = await with_branches(rig, "a")
    await rig.engine.report(xid, b.branch_id, B.PHASE_ONE_FAILED)
    assert (await rig.engine.commit(xid, wait=2.0)).status is S.ROLLBACKED
    assert rig.caller.calls == [("a", False)]


async def test_repeated_commit_gets_the_same_answer_and_no_second_phase_two(make):
    rig = await make()
    gate = asyncio.Event()
    rig.caller.hold["a"] = gate
    xid, _ = await with_branches(rig, "a", "b")
    first, second = await asyncio.gather(rig.engine.commit(xid), rig.engine.commit(xid))
    assert first.status is second.status is S.COMMITTING
    assert (await rig.engine.commit(xid)).status is S.COMMITTING
    # a rollback now is answered with the truth, not obeyed
    assert (await rig.engine.rollback(xid)).status is S.COMMITTING
    gate.set()
    await wait_status(rig.engine, xid, S.COMMITTED)
    assert (await rig.engine.commit(xid)).status is S.COMMITTED
    assert (await rig.engine.rollback(xid)).status is S.COMMITTED
    assert sorted(rig.caller.calls) == [("a", True), ("b", True)]
    assert rig.journal.history[xid] == [S.BEGIN, S.COMMITTING, S.COMMITTED]
    assert len(rig.events.done) == 1


async def test_repeated_rollback_of_a_finished_transaction_is_answered(make):
    rig = await make()
    xid = (await rig.engine.begin("t")).xid
    await rig.engine.rollback(xid)
    writes = rig.journal.writes
    for _ in range(3):
        assert (await rig.engine.rollback(xid)).status is S.ROLLBACKED
        assert (await rig.engine.commit(xid)).status is S.ROLLBACKED
    assert rig.journal.writes == writes


# --- timeouts -------------------------------------------------------------------------------------


async def test_timeout_rolls_back_a_transaction_left_in_begin(make):
    rig = await make()
    gate = asyncio.Event()
    rig.caller.hold["b"] = gate
    xid, _ = await with_branches(rig, "a", "b", timeout_ms=50)
    assert await status_of(rig.engine, xid) is S.BEGIN
    await wait_status(rig.engine, xid, S.TIMEOUT_ROLLBACKING, timeout=1.0)
    await eventually(lambda: rig.caller.calls == [("b", False)], timeout=1.0)
    gate.set()
    await wait_status(rig.engine, xid, S.TIMEOUT_ROLLBACKED, timeout=1.0)
    assert rig.caller.calls == [("b", False), ("a", False)]
    assert rig.journal.history[xid] == [S.BEGIN, S.TIMEOUT_ROLLBACKING, S.TIMEOUT_ROLLBACKED]
    assert rig.engine.active == 0


async def test_timeout_without_branches(make):
    rig = await make()
    xid = (await rig.engine.begin("t", 50)).xid
    await wait_status(rig.engine, xid, S.TIMEOUT_ROLLBACKED, timeout=1.0)
    assert rig.caller.calls == []


async def test_commit_after_the_timeout_answers_with_the_timeout_status(make):
    rig = await make()
    gate = asyncio.Event()
    rig.caller.hold["a"] = gate
    xid, _ = await with_branches(rig, "a", timeout_ms=50)
    await wait_status(rig.engine, xid, S.TIMEOUT_ROLLBACKING, timeout=1.0)
    assert (await rig.engine.commit(xid)).status is S.TIMEOUT_ROLLBACKING
    assert (await rig.engine.rollback(xid)).status is S.TIMEOUT_ROLLBACKING
    gate.set()
    await wait_status(rig.engine, xid, S.TIMEOUT_ROLLBACKED, timeout=1.0)
    assert (await rig.engine.commit(xid)).status is S.TIMEOUT_ROLLBACKED
    assert rig.caller.calls == [("a", False)]


async def test_a_decision_disarms_the_timeout(make):
    rig = await make()
    gate = asyncio.Event()
    rig.caller.hold["a"] = gate
    xid, _ = await with_branches(rig, "a", timeout_ms=50)
    assert (await rig.engine.commit(xid)).status is S.COMMITTING
    # 10× the timeout: it must not have turned into a rollback meanwhile
    await asyncio.sleep(0.5)
    assert await status_of(rig.engine, xid) is S.COMMITTING
    gate.set()
    await wait_status(rig.engine, xid, S.COMMITTED)
    assert rig.journal.history[xid] == [S.BEGIN, S.COMMITTING, S.COMMITTED]


# --- retries, stuck branches, operators -----------------------------------------------------


async def test_a_failing_branch_is_retried_with_backoff_until_it_succeeds(make):
    rig = await make()
    rig.caller.script["a"] = ["HTTP 503", "HTTP 503", None]
    xid, _ = await with_branches(rig, "a", "b")
    assert (await rig.engine.commit(xid, wait=2.0)).status is S.COMMITTED
    assert rig.journal.history[xid] == [S.BEGIN, S.COMMITTING, S.COMMIT_RETRYING, S.COMMITTED]
    assert Counter(rig.caller.calls) == {("a", True): 3, ("b", True): 1}
    _, (a, b) = await rig.engine.get(xid)
    assert (a.attempts, a.status, a.stuck, a.last_error) == (3, B.PHASE_TWO_COMMITTED, False, None)
    assert (b.attempts, b.status) == (1, B.PHASE_TWO_COMMITTED)
    assert Counter(rig.events.calls) == {False: 2, True: 2}
    # backoff: 10 ms after the first failure, 20 ms after the second (rand fixed at 0.5)
    t = rig.caller.times["a"]
    assert t[1] - t[0] >= 0.0099
    assert t[2] - t[1] >= 0.0199
    assert rig.events.stuck == []


async def test_a_failing_rollback_is_retried_as_rollback_retrying(make):
    rig = await make()
    rig.caller.script["a"] = ["HTTP 500"]
    xid, _ = await with_branches(rig, "a")
    assert (await rig.engine.rollback(xid, wait=2.0)).status is S.ROLLBACKED
    assert rig.journal.history[xid] == [
        S.BEGIN,
        S.ROLLBACKING,
        S.ROLLBACK_RETRYING,
        S.ROLLBACKED,
    ]
    assert rig.caller.calls == [("a", False), ("a", False)]


async def test_a_caller_exception_is_a_failure_with_its_reason(make):
    rig = await make()
    rig.caller.script["a"] = [RuntimeError("connection reset")]
    gate = asyncio.Event()
    xid, _ = await with_branches(rig, "a")
    await rig.engine.commit(xid)
    await eventually(lambda: len(rig.caller.results) == 1)
    rig.caller.hold["a"] = gate  # hold the retry so the failure can be read
    await eventually(lambda: len(rig.caller.calls) == 2)
    _, (a,) = await rig.engine.get(xid)
    assert a.status is B.PHASE_TWO_COMMIT_RETRYABLE
    assert a.last_error == "RuntimeError: connection reset"
    assert a.attempts == 1
    assert await status_of(rig.engine, xid) is S.COMMIT_RETRYING
    gate.set()
    await wait_status(rig.engine, xid, S.COMMITTED)


async def test_after_max_attempts_a_branch_is_stuck_until_an_operator_retries_it(make):
    rig = await make()
    rig.caller.default["a"] = "HTTP 503"
    xid, _ = await with_branches(rig, "a", "b")
    await rig.engine.commit(xid)
    await eventually(lambda: rig.engine.stuck() != [])
    (stuck,) = rig.engine.stuck()
    assert (stuck.resource_id, stuck.attempts, stuck.stuck) == ("a", 3, True)
    assert stuck.status is B.PHASE_TWO_COMMIT_RETRYABLE
    assert stuck.last_error == "HTTP 503"
    assert [b.branch_id for b in rig.events.stuck] == [stuck.branch_id]
    # it is not retried silently: 5× the longest backoff later, still three calls
    await asyncio.sleep(0.2)
    assert Counter(rig.caller.calls) == {("a", True): 3, ("b", True): 1}
    assert len(rig.events.stuck) == 1
    assert await status_of(rig.engine, xid) is S.COMMIT_RETRYING
    assert rig.engine.active == 1
    # durable: the journal says stuck too
    _, journalled = await rig.journal.find(xid)
    assert [b.stuck for b in journalled] == [True, False]
    # a TM retry changes nothing
    assert (await rig.engine.commit(xid)).status is S.COMMIT_RETRYING
    assert len(rig.caller.calls) == 4

    rig.caller.default["a"] = None
    again = await rig.engine.retry_branch(xid, stuck.branch_id)
    assert (again.stuck, again.attempts) == (False, 0)
    await wait_status(rig.engine, xid, S.COMMITTED)
    assert Counter(rig.caller.calls) == {("a", True): 4, ("b", True): 1}
    _, (a, _b) = await rig.engine.get(xid)
    assert (a.attempts, a.stuck, a.status) == (1, False, B.PHASE_TWO_COMMITTED)
    assert rig.engine.stuck() == []
    assert len(rig.events.stuck) == 1
    assert rig.journal.history[xid] == [S.BEGIN, S.COMMITTING, S.COMMIT_RETRYING, S.COMMITTED]


async def test_retry_branch_errors(make):
    rig = await make()
    xid, _ = await with_branches(rig, "a")
    with pytest.raises(BranchNotFound):
        await rig.engine.retry_branch(xid, 12345)
    with pytest.raises(TransactionNotFound):
        await rig.engine.retry_branch(OWNER + ":1", 1)
    await rig.engine.commit(xid, wait=2.0)
    with pytest.raises(TransactionNotActive):
        await rig.engine.retry_branch(xid, 1)


# --- registration and reports ---------------------------------------------------------------


async def test_register_and_report_are_journalled_in_order(make):
    rig = await make()
    xid = (await rig.engine.begin("t")).xid
    a = await rig.engine.register(xid, BranchType.TCC, "a", "http://h:1/cb", b'{"k":"v"}')
    b = await rig.engine.register(xid, BranchType.SAGA, "b", "http://h:1/cb", b"null")
    assert (a.seq, b.seq) == (0, 1)
    assert a.status is b.status is B.REGISTERED
    assert a.branch_id != b.branch_id
    reported = await rig.engine.report(xid, a.branch_id, B.PHASE_ONE_DONE)
    assert reported.status is B.PHASE_ONE_DONE
    _, journalled = await rig.journal.find(xid)
    assert [(j.resource_id, j.status, j.application_data) for j in journalled] == [
        ("a", B.PHASE_ONE_DONE, b'{"k":"v"}'),
        ("b", B.REGISTERED, b"null"),
    ]


async def test_register_after_commit_is_refused(make):
    rig = await make()
    gate = asyncio.Event()
    rig.caller.hold["a"] = gate
    xid, (a,) = await with_branches(rig, "a")
    await rig.engine.commit(xid)
    with pytest.raises(TransactionNotActive, match="Committing"):
        await rig.engine.register(xid, BranchType.TCC, "late", "http://h:1/cb", b"{}")
    gate.set()
    await wait_status(rig.engine, xid, S.COMMITTED)
    with pytest.raises(TransactionNotActive, match="Committed"):
        await rig.engine.register(xid, BranchType.TCC, "late", "http://h:1/cb", b"{}")
    with pytest.raises(TransactionNotActive):
        await rig.engine.report(xid, a.branch_id, B.PHASE_ONE_DONE)
    assert len((await rig.engine.get(xid))[1]) == 1


async def test_unknown_xid_and_unknown_branch(make):
    rig = await make()
    unknown = OWNER + ":424242"
    with pytest.raises(TransactionNotFound):
        await rig.engine.register(unknown, BranchType.TCC, "a", "http://h:1/cb", b"{}")
    with pytest.raises(TransactionNotFound):
        await rig.engine.report(unknown, 1, B.PHASE_ONE_DONE)
    with pytest.raises(TransactionNotFound):
        await rig.engine.commit(unknown)
    with pytest.raises(TransactionNotFound):
        await rig.engine.rollback(unknown)
    with pytest.raises(TransactionNotFound):
        await rig.engine.get(unknown)
    xid, (a,) = await with_branches(rig, "a")
    with pytest.raises(BranchNotFound, match="99"):
        await rig.engine.report(xid, 99, B.PHASE_ONE_DONE)
    with pytest.raises(InvalidRequest):
        await rig.engine.report(xid, a.branch_id, B.PHASE_TWO_COMMITTED)


async def test_a_late_report_after_phase_two_changes_nothing(make):
    rig = await make()
    gate = asyncio.Event()
    rig.caller.hold["b"] = gate
    xid, (a, _b) = await with_branches(rig, "a", "b")
    await rig.engine.commit(xid)

    async def a_status() -> BranchStatus:
        return (await rig.engine.get(xid))[1][0].status

    deadline = time.monotonic() + 2
    while await a_status() is not B.PHASE_TWO_COMMITTED:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.002)
    late = await rig.engine.report(xid, a.branch_id, B.PHASE_ONE_FAILED)
    assert late.status is B.PHASE_TWO_COMMITTED
    assert await a_status() is B.PHASE_TWO_COMMITTED
    gate.set()
    await wait_status(rig.engine, xid, S.COMMITTED)


# --- idempotency ------------------------------------------------------------------------------


async def test_idempotent_begin(make):
    rig = await make()
    first = await rig.engine.begin("t", 30_000, idempotency_key="k1", request_hash="h1")
    again = await rig.engine.begin("t", 30_000, idempotency_key="k1", request_hash="h1")
    assert again.xid == first.xid
    assert rig.engine.active == 1
    with pytest.raises(IdempotencyConflict, match="k1"):
        await rig.engine.begin("t", 30_000, idempotency_key="k1", request_hash="h2")
    other = await rig.engine.begin("t", 30_000, idempotency_key="k2", request_hash="h1")
    assert other.xid != first.xid
    # after it finished (and left memory) the key still answers, from the journal
    await rig.engine.commit(first.xid)
    later = await rig.engine.begin("t", 30_000, idempotency_key="k1", request_hash="h1")
    assert (later.xid, later.status) == (first.xid, S.COMMITTED)
    with pytest.raises(IdempotencyConflict):
        await rig.engine.begin("t", 30_000, idempotency_key="k1", request_hash="h2")
    assert rig.engine.active == 1


async def test_idempotent_register(make):
    rig = await make()
    xid = (await rig.engine.begin("t")).xid
    xid2 = (await rig.engine.begin("t")).xid
    args = (BranchType.TCC, "a", "http://h:1/cb", b"{}")
    first = await rig.engine.register(xid, *args, idempotency_key="r1", request_hash="h1")
    again = await rig.engine.register(xid, *args, idempotency_key="r1", request_hash="h1")
    assert again.branch_id == first.branch_id
    assert len((await rig.engine.get(xid))[1]) == 1
    with pytest.raises(IdempotencyConflict, match="r1"):
        await rig.engine.register(xid, *args, idempotency_key="r1", request_hash="h2")
    with pytest.raises(IdempotencyConflict):
        await rig.engine.register(xid2, *args, idempotency_key="r1", request_hash="h1")
    assert len((await rig.engine.get(xid2))[1]) == 0
    assert rig.engine.journal_ok  # a reused key is the caller's fault, not the journal's


# --- restart ----------------------------------------------------------------------------------


async def test_restart_resumes_phase_two_of_a_committing_transaction(make, tmp_path):
    path = str(tmp_path / "journal.db")
    first = await make(journal=SqliteJournal(path))
    gate = asyncio.Event()
    first.caller.hold["a"] = gate
    xid, _ = await with_branches(first, "a", "b")
    await first.engine.commit(xid)
    await eventually(lambda: ("b", True, True) in first.caller.results)
    # the process goes away mid-phase-two: "a" never answered
    await first.engine.stop(0)
    await first.journal.close()

    second = await make(journal=SqliteJournal(path), start=False)
    assert await second.engine.start() == 1
    await wait_status(second.engine, xid, S.COMMITTED)
    # only the unfinished branch is called again
    assert second.caller.calls == [("a", True)]
    record, branches = await second.journal.find(xid)
    assert record.status is S.COMMITTED
    assert [b.status for b in branches] == [B.PHASE_TWO_COMMITTED] * 2


async def test_restart_fires_a_passed_timeout_at_once(make, tmp_path):
    path = str(tmp_path / "journal.db")
    first = await make(journal=SqliteJournal(path))
    xid, _ = await with_branches(first, "a", timeout_ms=60_000)
    await first.engine.stop(0)
    await first.journal.close()

    # the new process starts two minutes later: the 60 s deadline has passed
    second = await make(journal=SqliteJournal(path), clock=Clock(T0 + 120_000), start=False)
    assert await second.engine.start() == 1
    await wait_status(second.engine, xid, S.TIMEOUT_ROLLBACKED, timeout=0.5)
    assert second.caller.calls == [("a", False)]


async def test_restart_rearms_the_remaining_timeout(make, tmp_path):
    path = str(tmp_path / "journal.db")
    first = await make(journal=SqliteJournal(path))
    xid, _ = await with_branches(first, "a", timeout_ms=60_000)
    await first.engine.stop(0)
    await first.journal.close()

    # restarted 50 ms before the deadline
    second = await make(journal=SqliteJournal(path), clock=Clock(T0 + 59_950), start=False)
    assert await second.engine.start() == 1
    assert await status_of(second.engine, xid) is S.BEGIN
    await wait_status(second.engine, xid, S.TIMEOUT_ROLLBACKED, timeout=1.0)


async def test_restart_keeps_a_stuck_branch_stuck(make, tmp_path):
    path = str(tmp_path / "journal.db")
    first = await make(journal=SqliteJournal(path))
    first.caller.default["a"] = "HTTP 503"
    xid, _ = await with_branches(first, "a")
    await first.engine.commit(xid)
    await eventually(lambda: first.engine.stuck() != [])
    await first.engine.stop(0)
    await first.journal.close()

    second = await make(journal=SqliteJournal(path), start=False)
    assert await second.engine.start() == 1
    assert [b.resource_id for b in second.engine.stuck()] == ["a"]
    assert await status_of(second.engine, xid) is S.COMMIT_RETRYING
    (branch,) = second.engine.stuck()
    await second.engine.retry_branch(xid, branch.branch_id)
    await wait_status(second.engine, xid, S.COMMITTED)
    assert second.caller.calls == [("a", True)]


# --- journal failures -------------------------------------------------------------------------


async def test_a_journal_failure_on_begin_leaves_no_transaction(make):
    rig = await make()
    rig.journal.fail = True
    with pytest.raises(JournalUnavailable):
        await rig.engine.begin("t", 50, idempotency_key="k", request_hash="h")
    assert rig.engine.active == 0
    rig.journal.fail = False
    assert await rig.journal.unfinished() == []
    assert rig.journal.history == {}
    # the key was not taken by the failed begin
    record = await rig.engine.begin("t", 60_000, idempotency_key="k", request_hash="other")
    assert record.status is S.BEGIN
    assert rig.engine.active == 1


async def test_a_journal_failure_on_register_adds_no_branch(make):
    rig = await make()
    xid = (await rig.engine.begin("t")).xid
    rig.journal.fail = True
    with pytest.raises(JournalUnavailable):
        await rig.engine.register(xid, BranchType.TCC, "a", "http://h:1/cb", b"{}")
    rig.journal.fail = False
    assert (await rig.engine.get(xid))[1] == []
    assert (await rig.journal.find(xid))[1] == []


async def test_a_journal_failure_on_commit_leaves_begin_and_a_retry_commits(make):
    rig = await make()
    xid = (await rig.engine.begin("t")).xid
    rig.journal.fail = True
    with pytest.raises(JournalUnavailable):
        await rig.engine.commit(xid)
    rig.journal.fail = False
    assert await status_of(rig.engine, xid) is S.BEGIN
    assert (await rig.engine.commit(xid)).status is S.COMMITTED


async def test_a_failed_decision_write_keeps_the_timeout_armed(make):
    rig = await make()
    xid = (await rig.engine.begin("t", 50)).xid
    rig.journal.fail_next = 1
    with pytest.raises(JournalUnavailable):
        await rig.engine.commit(xid)
    # the TM gave up; the journal works again; the timeout must still roll it back
    await wait_status(rig.engine, xid, S.TIMEOUT_ROLLBACKED, timeout=1.0)


async def test_a_transient_journal_failure_in_phase_two_does_not_halt_it(make):
    rig = await make()
    xid, _ = await with_branches(rig, "a")
    rig.journal.fail_branch_writes = True
    await rig.engine.commit(xid)
    await eventually(lambda: rig.journal.failures >= 2)  # it went round again
    assert await status_of(rig.engine, xid) is S.COMMITTING
    rig.journal.fail_branch_writes = False
    await wait_status(rig.engine, xid, S.COMMITTED, timeout=1.0)
    _, (a,) = await rig.engine.get(xid)
    assert a.status is B.PHASE_TWO_COMMITTED
    # the confirm whose result could not be journalled is repeated (the app's fence
    # answers a repeat), never skipped
    assert rig.caller.calls[0] == ("a", True)
    assert len(rig.caller.calls) == rig.journal.failures + 1


async def test_a_journal_failure_when_the_timeout_fires_does_not_lose_it(make):
    rig = await make()
    xid = (await rig.engine.begin("t", 50)).xid
    rig.journal.fail = True
    try:
        await eventually(lambda: rig.journal.failures >= 1, timeout=1.0)
        assert await status_of(rig.engine, xid) is S.BEGIN
    finally:
        rig.journal.fail = False
    await wait_status(rig.engine, xid, S.TIMEOUT_ROLLBACKED, timeout=1.0)
    assert rig.journal.history[xid] == [S.BEGIN, S.TIMEOUT_ROLLBACKING, S.TIMEOUT_ROLLBACKED]


async def test_concurrent_retries_of_one_begin_get_the_same_xid(make, tmp_path):
    rig = await make(journal=SqliteJournal(str(tmp_path / "journal.db")))
    results = await asyncio.gather(
        *(rig.engine.begin("t", 60_000, idempotency_key="k", request_hash="h") for _ in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(r, GlobalRecord) for r in results), results
    assert len({r.xid for r in results}) == 1
    assert rig.engine.active == 1
    # a concurrent begin under the same key but another request is a conflict, not a wait
    first, other = await asyncio.gather(
        rig.engine.begin("t", 60_000, idempotency_key="k2", request_hash="h"),
        rig.engine.begin("t", 60_000, idempotency_key="k2", request_hash="other"),
        return_exceptions=True,
    )
    assert isinstance(first, GlobalRecord)
    assert isinstance(other, IdempotencyConflict)


async def test_a_failed_concurrent_begin_fails_its_retries_too_and_frees_the_key(make):
    rig = await make()
    rig.journal.fail_next = 1
    results = await asyncio.gather(
        rig.engine.begin("t", 60_000, idempotency_key="k", request_hash="h"),
        rig.engine.begin("t", 60_000, idempotency_key="k", request_hash="h"),
        return_exceptions=True,
    )
    assert [type(r) for r in results] == [JournalUnavailable, JournalUnavailable]
    assert rig.engine.active == 0
    again = await rig.engine.begin("t", 60_000, idempotency_key="k", request_hash="h")
    assert again.status is S.BEGIN


# --- Saga order under failure -----------------------------------------------------------------


async def test_rollback_does_not_pass_a_failed_compensation(make):
    rig = await make()
    rig.caller.script["c"] = ["HTTP 503", None]
    xid, _ = await with_branches(rig, "a", "b", "c", branch_type=BranchType.SAGA)
    assert (await rig.engine.rollback(xid, wait=2.0)).status is S.ROLLBACKED
    assert rig.caller.calls == [("c", False), ("c", False), ("b", False), ("a", False)]


async def test_a_stuck_compensation_holds_back_the_earlier_ones(make):
    rig = await make()
    rig.caller.default["c"] = "HTTP 503"
    xid, _ = await with_branches(rig, "a", "b", "c", branch_type=BranchType.SAGA)
    await rig.engine.rollback(xid)
    await eventually(lambda: rig.engine.stuck() != [])
    await asyncio.sleep(0.2)  # 5x the longest backoff: nothing else may run meanwhile
    assert rig.caller.calls == [("c", False)] * 3


async def test_skip_branch_settles_a_stuck_branch_without_calling_it(make):
    rig = await make()
    rig.caller.default["a"] = "HTTP 503"
    xid, _ = await with_branches(rig, "a", "b")
    await rig.engine.commit(xid)
    await eventually(lambda: rig.engine.stuck() != [])
    (stuck,) = rig.engine.stuck()
    assert rig.engine.find_branch(stuck.branch_id) == stuck
    skipped = await rig.engine.skip_branch(xid, stuck.branch_id)
    assert (skipped.status, skipped.stuck) == (B.PHASE_TWO_COMMITTED, False)
    assert skipped.last_error == "skipped by an operator"
    await wait_status(rig.engine, xid, S.COMMITTED)
    assert Counter(rig.caller.calls) == {("a", True): 3, ("b", True): 1}
    assert rig.engine.find_branch(stuck.branch_id) is None
    with pytest.raises(TransactionNotActive):
        await rig.engine.skip_branch(xid, stuck.branch_id)


# --- random programs ----------------------------------------------------------------------------

FAST = PhaseTwoRetry(initial="1ms", max="2ms", max_attempts=3)

op = st.one_of(
    st.tuples(st.just("begin")),
    st.tuples(st.just("register"), st.integers(0, 3), st.integers(0, 2)),
    st.tuples(st.just("report"), st.integers(0, 3), st.integers(0, 5), st.booleans()),
    st.tuples(st.just("commit"), st.integers(0, 3)),
    st.tuples(st.just("rollback"), st.integers(0, 3)),
    st.tuples(st.just("timeout"), st.integers(0, 3)),
)


async def _fire_timeout(engine: Engine, xid: str) -> None:
    """What the timer does when the deadline passes, fired now (deterministically) instead
    of after a real delay: the engine's own timer callback."""
    live = engine._live[xid]
    assert live.timer is not None
    live.timer.cancel()
    await engine._on_timeout(live)


async def _run_program(ops: list[tuple[Any, ...]]) -> None:
    journal = RecordingJournal()
    await journal.open()
    caller = FakeCaller()
    engine = Engine(
        journal,
        caller,
        owner_host="10.0.0.9",
        owner_port=8091,
        policy=FAST,
        clock_ms=Clock(),
        rand=lambda: 0.5,
    )
    await engine.start()
    xids: list[str] = []
    branches: dict[str, list[BranchRecord]] = {}
    #: the model: what each transaction's outcome must be
    decided: dict[str, GlobalStatus] = {}
    #: phase-one status of each branch, by branch id
    phase_one: dict[int, BranchStatus] = {}
    try:
        for o in ops:
            kind = o[0]
            if kind == "begin":
                xid = (await engine.begin("p", 60_000)).xid
                xids.append(xid)
                branches[xid] = []
                continue
            if not xids:
                continue
            xid = xids[o[1] % len(xids)]
            if kind == "register":
                rid = f"{xid.rsplit(':', 1)[1]}-{len(branches[xid])}"
                caller.script[rid] = ["HTTP 503"] * o[2]  # fewer failures than max_attempts
                if xid in decided:
                    with pytest.raises(TransactionNotActive):
                        await engine.register(xid, BranchType.SAGA, rid, "http://h:1/cb", b"{}")
                    continue
                b = await engine.register(xid, BranchType.SAGA, rid, "http://h:1/cb", b"{}")
                branches[xid].append(b)
            elif kind == "report":
                if not branches[xid]:
                    with pytest.raises((BranchNotFound, TransactionNotActive)):
                        await engine.report(xid, 1, B.PHASE_ONE_DONE)
                    continue
                b = branches[xid][o[2] % len(branches[xid])]
                status = B.PHASE_ONE_DONE if o[3] else B.PHASE_ONE_FAILED
                if xid in decided:
                    with pytest.raises(TransactionNotActive):
                        await engine.report(xid, b.branch_id, status)
                    continue
                await engine.report(xid, b.branch_id, status)
                phase_one[b.branch_id] = status
            elif kind in ("commit", "rollback"):
                if xid not in decided:
                    failed = any(
                        phase_one.get(b.branch_id) is B.PHASE_ONE_FAILED for b in branches[xid]
                    )
                    if kind == "commit" and not failed:
                        decided[xid] = S.COMMITTED
                    else:
                        decided[xid] = S.ROLLBACKED
                fn = engine.commit if kind == "commit" else engine.rollback
                record = await fn(xid, wait=5.0)
                assert record.status is decided[xid], (o, record)
            elif kind == "timeout":
                if xid not in decided:
                    decided[xid] = S.TIMEOUT_ROLLBACKED
                    await _fire_timeout(engine, xid)
                    await wait_status(engine, xid, S.TIMEOUT_ROLLBACKED, timeout=5.0)
        # whatever is still Begin times out
        for xid in xids:
            if xid not in decided:
                decided[xid] = S.TIMEOUT_ROLLBACKED
                await _fire_timeout(engine, xid)
        await eventually(lambda: engine.active == 0, timeout=5.0)

        assert engine.stuck() == []
        assert await journal.unfinished() == []
        for xid in xids:
            record, stored = await engine.get(xid)
            assert record.status is decided[xid], xid
            assert (await journal.find(xid)) == (record, stored)
            commit = record.status is S.COMMITTED
            want = B.PHASE_TWO_COMMITTED if commit else B.PHASE_TWO_ROLLBACKED
            assert [b.branch_id for b in stored] == [b.branch_id for b in branches[xid]]
            for b in stored:
                assert b.status is want
                successes = [r for r in caller.results if r[0] == b.resource_id and r[2]]
                # exactly one successful phase-two call, in the outcome's direction
                assert successes == [(b.resource_id, commit, True)]
                assert all(
                    c == (b.resource_id, commit) for c in caller.calls if c[0] == b.resource_id
                )
            if not commit and stored:
                # one rollback pass goes in reverse registration order
                first_calls = []
                for rid, _ in caller.calls:
                    if rid in {b.resource_id for b in stored} and rid not in first_calls:
                        first_calls.append(rid)
                assert first_calls == [b.resource_id for b in reversed(stored)]
    finally:
        await engine.stop(0)
        await journal.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=5, max_size=40))
def test_random_programs_finish_every_transaction_once_in_its_direction(ops):
    # each program on its own loop: hypothesis runs examples synchronously
    asyncio.run(_run_program([("begin",), ("begin",), *ops]))
