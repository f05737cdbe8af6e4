"""The transaction engine: global transactions, branches, timeouts and phase two.

Theory of operation. Live (unfinished) transactions are held in memory, each with a lock
that serialises its state changes; every change is written to the journal, and awaited
(fsync'd), before anyone is told about it. Global status moves only through the table in
states.py. Once decided, a transaction's phase two is driven by one named task: commit calls
every branch's confirm concurrently; rollback calls cancel/compensate one branch at a time in
reverse registration order (Saga). A branch that fails is retried with exponential backoff and
jitter; after `max_attempts` it is marked stuck and left for an operator, never retried
silently forever. On start, every unfinished transaction in the journal is resumed: its
timeout re-armed (fired at once if passed) or its phase two restarted.

I/O comes in through the constructor: the journal, the branch caller (HTTP callbacks), the
wall clock and the XID generator, so the engine is tested with fakes and with the real ones.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol, TypeVar

from sidecar.config import PhaseTwoRetry
from sidecar.coordinator.records import BranchRecord, GlobalRecord, Journal
from sidecar.coordinator.states import (
    BranchStatus,
    BranchType,
    Event,
    GlobalStatus,
    decided_like,
    transition,
)
from sidecar.errors import (
    BranchNotFound,
    DuplicateKey,
    IdempotencyConflict,
    InvalidRequest,
    JournalUnavailable,
    NotOwner,
    TransactionNotActive,
    TransactionNotFound,
)
from sidecar.spans import recording, tracer
from sidecar.tracing import (
    TraceContext,
    enter,
    new_trace_id,
    transaction_context,
    transaction_span_id,
)
from sidecar.tracing import parse as parse_traceparent
from sidecar.xid import TxidGenerator, format_owner

log = logging.getLogger("sidecar.engine")

_T = TypeVar("_T")

#: finished transactions kept in memory for status queries (older ones: from the journal)
_FINISHED_CACHE: Final = 10_000


class BranchCaller(Protocol):
    async def phase_two(self, branch: BranchRecord, commit: bool) -> str | None:
        """Call the branch's commit (or rollback) callback. None: done; else why not."""
        ...


class EngineEvents(Protocol):
    """What the engine reports (metrics, alerts); all optional to act on."""

    def finished(self, record: GlobalRecord) -> None: ...
    def branch_stuck(self, branch: BranchRecord) -> None: ...
    def phase_two_call(self, ok: bool) -> None: ...


class Ownership(Protocol):
    """Replicas sharing one journal (pg_lease.Replica): which transactions this engine
    drives. Without it (the default) the engine drives every transaction in its journal."""

    async def adopt(self, xid: str) -> tuple[GlobalRecord, list[BranchRecord]] | None:
        """Take over a transaction still in Begin that another replica drives; None when
        it is not in Begin (or unknown)."""
        ...

    async def may_drive(self) -> None:
        """Return once this replica holds its lease (before every phase-two call)."""
        ...


class _NoEvents:
    def finished(self, record: GlobalRecord) -> None:
        pass

    def branch_stuck(self, branch: BranchRecord) -> None:
        pass

    def phase_two_call(self, ok: bool) -> None:
        pass


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _transaction_trace(record: GlobalRecord) -> TraceContext | None:
    """The position of the transaction's own span: the parent of every call made for it."""
    stored = parse_traceparent(record.traceparent)
    return None if stored is None else transaction_context(record.xid, stored)


def _end_transaction_span(record: GlobalRecord, branches: int) -> None:
    """The transaction's span, begin → final, recorded when it ends here (its id is derived
    from the XID, so the calls made before a restart already name it as their parent)."""
    if not recording():
        return  # nothing names this span's end: without an exporter it is not built
    stored = parse_traceparent(record.traceparent)
    if stored is None:
        return
    own = transaction_span_id(record.xid)
    root = stored.span_id == own  # begun without a trace: the transaction's span is the root
    tracer().start(
        f"gts transaction {record.name}",
        None if root else stored,
        kind="server",
        attributes={
            "gts.xid": record.xid,
            "gts.name": record.name,
            "gts.status": record.status.value,
            "gts.branches": branches,
        },
        span_id=own,
        trace_id=stored.trace_id,
        start_ns=record.begin_ms * 1_000_000,
    ).end(end_ns=record.updated_ms * 1_000_000)


def backoff(policy: PhaseTwoRetry, attempt: int, rand: Callable[[], float]) -> float:
    """Seconds before retry number `attempt` (1-based): initial × multiplier^(n-1), capped,
    ± jitter."""
    base = min(policy.max, policy.initial * policy.multiplier ** max(0, attempt - 1))
    spread = base * policy.jitter
    return max(0.0, base - spread + 2 * spread * rand())


@dataclass(eq=False)
class _Live:
    record: GlobalRecord
    branches: list[BranchRecord]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timer: asyncio.TimerHandle | None = None
    driver: asyncio.Task[None] | None = None
    finished: bool = False
    #: one per call waiting for the outcome (each with its own timeout), answered at the
    #: end; made only when someone waits (most decisions return the outcome directly)
    waiters: list[asyncio.Future[None]] | None = None


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _wait_finished(live: _Live, timeout: float) -> None:
    """Until the transaction is finished, or `timeout` seconds. (A future and a timer of its
    own: asyncio.wait's sets, callbacks and second future cost more, once per decision.)"""
    waiter = asyncio.get_running_loop().create_future()
    if live.waiters is None:
        live.waiters = []
    live.waiters.append(waiter)
    timer = asyncio.get_running_loop().call_later(timeout, _release, waiter)
    try:
        await waiter
    finally:
        timer.cancel()
        if live.waiters is not None and not live.finished:
            live.waiters.remove(waiter)  # timed out (or cancelled): not kept till the end


def _index(branches: Sequence[BranchRecord], branch_id: int) -> int:
    return next(i for i, b in enumerate(branches) if b.branch_id == branch_id)


class Engine:
    def __init__(
        self,
        journal: Journal,
        caller: BranchCaller,
        *,
        owner_host: str,
        owner_port: int,
        policy: PhaseTwoRetry,
        default_timeout_ms: int = 60_000,
        max_timeout_ms: int = 86_400_000,
        retention_ms: int = 86_400_000,
        clock_ms: Callable[[], int] = _wall_ms,
        ids: TxidGenerator | None = None,
        events: EngineEvents | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.journal = journal
        self.caller = caller
        self.owner = format_owner(owner_host, owner_port)
        self.policy = policy
        self.default_timeout_ms = default_timeout_ms
        self.max_timeout_ms = max_timeout_ms
        self.retention_ms = retention_ms
        self._clock_ms = clock_ms
        self._ids = ids or TxidGenerator()
        self._events: EngineEvents = events or _NoEvents()
        self._rand = rand
        self._live: dict[str, _Live] = {}
        self._finished: OrderedDict[str, tuple[GlobalRecord, list[BranchRecord]]] = OrderedDict()
        self._keys: dict[str, str] = {}  # begin idempotency key → xid, for live ones
        self._begins: dict[str, asyncio.Future[GlobalRecord]] = {}  # begins in flight, by key
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        #: False since the last journal write failed (until one succeeds): readiness says so
        self.journal_ok = True
        #: replicas on a shared journal: set by pg_lease.Replica.attach
        self.ownership: Ownership | None = None
        self._adopting = asyncio.Lock()

    # --- the journal ---------------------------------------------------------------------------

    async def _write(
        self, globals_: Sequence[GlobalRecord] = (), branches: Sequence[BranchRecord] = ()
    ) -> None:
        """Every write goes through here, so readiness can say when the journal fails."""
        try:
            await self.journal.write(globals_, branches)
        except DuplicateKey:
            raise  # the write's own fault (a reused idempotency key), not the journal's
        except NotOwner as exc:
            # another replica drives these now: let go of them (the journal is fine)
            for xid in exc.xids:
                self.forget(xid)
            raise
        except JournalUnavailable:
            self.journal_ok = False
            raise
        self.journal_ok = True

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> int:
        """Resume every unfinished transaction in the journal; returns how many."""
        self._loop = asyncio.get_running_loop()
        resumed = self.resume(await self.journal.unfinished())
        if resumed:
            log.info("resumed unfinished transactions", extra={"count": resumed})
        # finished transactions leave the journal through retention.py (the control plane
        # runs it for the journal and the files beside it)
        return resumed

    def resume(self, found: Sequence[tuple[GlobalRecord, Sequence[BranchRecord]]]) -> int:
        """Drive these unfinished transactions (from the journal at start, or taken over
        from another replica): timeouts re-armed, phase two restarted."""
        for record, branches in found:
            self._resume(record, branches)
        return len(found)

    def _resume(self, record: GlobalRecord, branches: Sequence[BranchRecord]) -> _Live:
        self.forget(record.xid)  # a stale copy from before another replica had it
        live = _Live(record, list(branches))
        self._live[record.xid] = live
        if record.idempotency_key:
            self._keys[record.idempotency_key] = record.xid
        if record.status is GlobalStatus.BEGIN:
            self._arm_timeout(live)
        else:
            self._start_driver(live)
        return live

    def forget(self, xid: str) -> None:
        """Stop driving a transaction another replica took over (it stays in the journal)."""
        live = self._live.pop(xid, None)
        if live is None:
            return
        if live.timer is not None:
            live.timer.cancel()
            live.timer = None
        if live.driver is not None:
            live.driver.cancel()
        if live.record.idempotency_key:
            self._keys.pop(live.record.idempotency_key, None)

    def forget_all(self) -> None:
        """This replica lost its lease: drive nothing until transactions are given back."""
        for xid in list(self._live):
            self.forget(xid)

    async def _adopt(self, xid: str) -> _Live | None:
        """Replicas: take over a Begin transaction another replica drives (or drove)."""
        if self.ownership is None:
            return None
        async with self._adopting:  # one at a time: rare (after a failover), and never twice
            live = self._live.get(xid)
            if live is not None:
                return live
            found = await self.ownership.adopt(xid)
            return None if found is None else self._resume(*found)

    async def stop(self, timeout: float) -> None:
        """Stop: phase two in progress gets `timeout` seconds; what is left stays journalled
        and resumes on the next start."""
        self._stopping = True
        for live in self._live.values():
            if live.timer is not None:
                live.timer.cancel()
        drivers = [lv.driver for lv in self._live.values() if lv.driver is not None]
        if drivers:
            _, pending = await asyncio.wait(drivers, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def active(self) -> int:
        return len(self._live)

    # --- the TM's calls -----------------------------------------------------------------------

    async def begin(
        self,
        name: str,
        timeout_ms: int | None = None,
        *,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        traceparent: str | None = None,
    ) -> GlobalRecord:
        """Begin a transaction; `traceparent` is the begin call's (W3C), stored with it."""
        timeout_ms = self.default_timeout_ms if timeout_ms is None else timeout_ms
        if not 0 < timeout_ms <= self.max_timeout_ms:
            raise InvalidRequest(
                f"timeoutMs must be between 1 and {self.max_timeout_ms} (got {timeout_ms})"
            )
        if idempotency_key is not None:
            # retries of one begin may arrive together: the first does the work, the others
            # wait for it and get its transaction
            in_flight = self._begins.get(idempotency_key)
            if in_flight is not None:
                record = await asyncio.shield(in_flight)
                if record.request_hash != request_hash:
                    raise IdempotencyConflict(
                        f"Idempotency-Key {idempotency_key!r} was used for a different begin"
                    )
                return (await self.get(record.xid))[0]
            fut: asyncio.Future[GlobalRecord] = asyncio.get_running_loop().create_future()
            self._begins[idempotency_key] = fut
            try:
                record = await self._begin_once(
                    name, timeout_ms, idempotency_key, request_hash, traceparent
                )
            except BaseException as exc:
                fut.set_exception(exc)
                fut.exception()  # retrieved: waiters re-raise it, nobody else needs it
                raise
            else:
                fut.set_result(record)
                return record
            finally:
                del self._begins[idempotency_key]
        return await self._begin_once(name, timeout_ms, None, request_hash, traceparent)

    async def _begin_once(
        self,
        name: str,
        timeout_ms: int,
        idempotency_key: str | None,
        request_hash: str | None,
        traceparent: str | None = None,
    ) -> GlobalRecord:
        if idempotency_key is not None:
            earlier = await self._begin_by_key(idempotency_key)
            if earlier is not None:
                if earlier.request_hash != request_hash:
                    raise IdempotencyConflict(
                        f"Idempotency-Key {idempotency_key!r} was used for a different begin"
                    )
                return (await self.get(earlier.xid))[0]
        now = self._clock_ms()
        xid = f"{self.owner}:{self._ids.next()}"
        caller = parse_traceparent(traceparent)
        if caller is None:
            # no trace came with the begin: the transaction's span is the root of a new one
            caller = TraceContext(new_trace_id(), transaction_span_id(xid))
        record = GlobalRecord(
            xid=xid,
            name=name,
            status=GlobalStatus.BEGIN,
            timeout_ms=timeout_ms,
            begin_ms=now,
            updated_ms=now,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            traceparent=caller.traceparent,
        )
        live = _Live(record, [])
        self._live[xid] = live
        if idempotency_key is not None:
            self._keys[idempotency_key] = xid
        try:
            await self._write([record])
        except BaseException as exc:
            self._live.pop(xid, None)
            if idempotency_key is not None:
                self._keys.pop(idempotency_key, None)
                if isinstance(exc, DuplicateKey) and self.ownership is not None:
                    earlier = await self.journal.find_global_by_key(idempotency_key)
                    if earlier is not None:
                        if earlier.request_hash != request_hash:
                            raise IdempotencyConflict(
                                f"Idempotency-Key {idempotency_key!r} was used for a "
                                "different begin"
                            ) from None
                        return (await self.get(earlier.xid))[0]
            raise
        self._arm_timeout(live)
        return record

    async def _begin_by_key(self, key: str) -> GlobalRecord | None:
        xid = self._keys.get(key)
        if xid is not None and xid in self._live:
            return self._live[xid].record
        if self.ownership is not None:
            # replicas: no read before the write (a round trip to the database per begin);
            # a key used before, here or at another replica, is found by the shared unique
            # index at the write (DuplicateKey, below)
            return None
        return await self.journal.find_global_by_key(key)

    async def commit(self, xid: str, wait: float = 0.0) -> GlobalRecord:
        return await self._moved(xid, lambda: self._decide(xid, Event.COMMIT, wait))

    async def rollback(self, xid: str, wait: float = 0.0) -> GlobalRecord:
        return await self._moved(xid, lambda: self._decide(xid, Event.ROLLBACK, wait))

    async def _moved(self, xid: str, op: Callable[[], Awaitable[_T]]) -> _T:
        """Replicas: a call made on a stale copy (another replica took the transaction over
        since) fails the journal's fence, which forgets the copy, or misses a branch another
        replica registered; once more, from the journal."""
        try:
            return await op()
        except (NotOwner, BranchNotFound) as exc:
            if self.ownership is None or (isinstance(exc, NotOwner) and exc.lease_lost):
                raise
            self.forget(xid)
            return await op()

    async def _decide(self, xid: str, event: Event, wait: float) -> GlobalRecord:
        live = self._live.get(xid) or await self._adopt(xid)
        if live is None:
            # finished (or unknown): a repeated decision is answered with the outcome
            return (await self.get(xid))[0]
        async with live.lock:
            status = live.record.status
            if status is GlobalStatus.BEGIN:
                if event is Event.COMMIT and any(
                    b.status is BranchStatus.PHASE_ONE_FAILED for b in live.branches
                ):
                    # a branch whose try failed cannot be confirmed: the whole thing rolls back
                    event = Event.ROLLBACK
                decided = transition(status, event)
                if not live.branches:
                    # nothing to drive: write the outcome at once (one fsync, not two); a
                    # crash before it leaves Begin, which times out and rolls back, and
                    # nobody was told otherwise
                    await self._set_status(live, transition(decided, Event.PHASE_TWO_DONE))
                else:
                    await self._set_status(live, decided)
                # only once the decision is on disk: a failed write keeps the timeout armed
                if live.timer is not None:
                    live.timer.cancel()
                    live.timer = None
                if not live.branches:
                    self._retire(live)
                else:
                    self._start_driver(live)
            elif not decided_like(status, event):
                # e.g. commit after the timeout rolled it back: the answer is the truth
                log.info(
                    "decision refused: already decided otherwise",
                    extra={"xid": xid, "status": status.value, "event": event.value},
                )
        if wait > 0 and not live.finished:
            await _wait_finished(live, wait)
        return live.record

    async def get(self, xid: str) -> tuple[GlobalRecord, list[BranchRecord]]:
        live = self._live.get(xid)
        # replicas: a copy in Begin may be stale (another replica can take it over to
        # register or decide); the journal has the truth
        if live is not None and (
            self.ownership is None or live.record.status is not GlobalStatus.BEGIN
        ):
            return live.record, list(live.branches)
        cached = self._finished.get(xid)
        if cached is not None:
            return cached
        found = await self.journal.find(xid)
        if found is None:
            raise TransactionNotFound(f"no transaction {xid!r} at this coordinator")
        return found

    # --- the RM's calls -----------------------------------------------------------------------

    async def register(
        self,
        xid: str,
        branch_type: BranchType,
        resource_id: str,
        callback_url: str,
        application_data: bytes,
        *,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        traceparent: str | None = None,
    ) -> BranchRecord:
        """Register a branch; `traceparent` is the register call's (W3C), the parent of
        the registration's span (else the transaction's own span is)."""
        return await self._moved(
            xid,
            lambda: self._register(
                xid,
                branch_type,
                resource_id,
                callback_url,
                application_data,
                idempotency_key,
                request_hash,
                traceparent,
            ),
        )

    async def _register(
        self,
        xid: str,
        branch_type: BranchType,
        resource_id: str,
        callback_url: str,
        application_data: bytes,
        idempotency_key: str | None,
        request_hash: str | None,
        traceparent: str | None = None,
    ) -> BranchRecord:
        live = await self._live_or_explain(xid)
        async with live.lock:
            if idempotency_key is not None:
                earlier = next(
                    (b for b in live.branches if b.idempotency_key == idempotency_key), None
                )
                if earlier is not None:
                    return self._repeated(earlier, xid, request_hash)
            status = live.record.status
            if status is not GlobalStatus.BEGIN:
                raise TransactionNotActive(
                    f"transaction {xid!r} is {status.value}: no new branches"
                )
            branch = BranchRecord(
                branch_id=self._ids.next(),
                xid=xid,
                seq=len(live.branches),
                branch_type=branch_type,
                resource_id=resource_id,
                callback_url=callback_url,
                application_data=application_data,
                status=BranchStatus.REGISTERED,
                updated_ms=self._clock_ms(),
                idempotency_key=idempotency_key,
                request_hash=request_hash,
            )
            # the registration's span names nothing (no call carries its id): without an
            # exporter it is not built at all (two parses, a hash and a random id each)
            span = (
                tracer().start(
                    "gts register branch",
                    parse_traceparent(traceparent) or _transaction_trace(live.record),
                    attributes={
                        "gts.xid": xid,
                        "gts.branch_id": str(branch.branch_id),
                        "gts.resource_id": resource_id,
                        "gts.branch_type": branch_type.value,
                    },
                )
                if recording()
                else None
            )
            try:
                await self._write(branches=[branch])
            except DuplicateKey:
                if span is not None:
                    span.end("idempotency key of another transaction")
                # the key is a branch's of another transaction (this one's are in memory):
                # found by the journal's unique index rather than a read before every write
                assert idempotency_key is not None
                found = await self.journal.find_branch_by_key(idempotency_key)
                if found is None:
                    raise
                return self._repeated(found, xid, request_hash)
            except BaseException as exc:
                if span is not None:
                    span.end(f"{type(exc).__name__}: {exc}")
                raise
            if span is not None:
                span.end()
            live.branches.append(branch)
            return branch

    @staticmethod
    def _repeated(earlier: BranchRecord, xid: str, request_hash: str | None) -> BranchRecord:
        """A registration under a key already used: the same one again gets its branch."""
        if earlier.request_hash != request_hash or earlier.xid != xid:
            raise IdempotencyConflict(
                f"Idempotency-Key {earlier.idempotency_key!r} was used for a different registration"
            )
        return earlier

    async def report(self, xid: str, branch_id: int, status: BranchStatus) -> BranchRecord:
        return await self._moved(xid, lambda: self._report(xid, branch_id, status))

    async def _report(self, xid: str, branch_id: int, status: BranchStatus) -> BranchRecord:
        if status not in (BranchStatus.PHASE_ONE_DONE, BranchStatus.PHASE_ONE_FAILED):
            raise InvalidRequest("status must be PhaseOne_Done or PhaseOne_Failed")
        live = await self._live_or_explain(xid)
        async with live.lock:
            index = next((i for i, b in enumerate(live.branches) if b.branch_id == branch_id), None)
            if index is None:
                raise BranchNotFound(f"no branch {branch_id} in transaction {xid!r}")
            branch = live.branches[index]
            if branch.status not in (
                BranchStatus.REGISTERED,
                BranchStatus.PHASE_ONE_DONE,
                BranchStatus.PHASE_ONE_FAILED,
            ):
                return branch  # phase two already ran: a late report changes nothing
            updated = replace(branch, status=status, updated_ms=self._clock_ms())
            await self._write(branches=[updated])
            live.branches[index] = updated
            return updated

    async def _live_or_explain(self, xid: str) -> _Live:
        live = self._live.get(xid) or await self._adopt(xid)
        if live is not None:
            return live
        record, _ = await self.get(xid)  # raises TransactionNotFound
        raise TransactionNotActive(f"transaction {xid!r} is {record.status.value}")

    # --- timeouts -----------------------------------------------------------------------------

    def _arm_timeout(self, live: _Live) -> None:
        loop = self._loop or asyncio.get_running_loop()
        delay = max(0.0, (live.record.deadline_ms - self._clock_ms()) / 1000)
        live.timer = loop.call_later(
            delay, lambda: self._spawn(self._on_timeout(live), f"timeout {live.record.xid}")
        )

    async def _on_timeout(self, live: _Live) -> None:
        live.timer = None
        if self._live.get(live.record.xid) is not live:
            return  # forgotten: another replica drives it now
        async with live.lock:
            if live.record.status is not GlobalStatus.BEGIN or self._stopping:
                return
            try:
                await self._set_status(live, transition(GlobalStatus.BEGIN, Event.TIMEOUT))
            except JournalUnavailable as exc:
                # not lost: try again shortly (the transaction stays Begin meanwhile, and a
                # commit that arrives first is refused only once the timeout is journalled)
                log.error(
                    "timeout not journalled; retrying",
                    extra={"xid": live.record.xid, "error": exc.message},
                )
                loop = self._loop or asyncio.get_running_loop()
                live.timer = loop.call_later(
                    self.policy.initial,
                    lambda: self._spawn(self._on_timeout(live), f"timeout {live.record.xid}"),
                )
                return
            self._start_driver(live)

    # --- phase two ----------------------------------------------------------------------------

    def _start_driver(self, live: _Live) -> None:
        if live.driver is None or live.driver.done():
            live.driver = self._spawn(self._drive(live), f"phase-two {live.record.xid}")

    async def _drive(self, live: _Live) -> None:
        # this task's calls (and log lines) are about the transaction, in its trace
        enter(_transaction_trace(live.record), live.record.xid)
        attempt = 0
        while True:
            try:
                if await self._drive_once(live):
                    return
                attempt = 0
            except JournalUnavailable as exc:
                # the journal refused a write: nothing was acknowledged, so go round again
                # after a pause rather than let the transaction hang in memory
                attempt += 1
                log.error(
                    "phase two paused: journal unavailable",
                    extra={"xid": live.record.xid, "error": exc.message},
                )
                await asyncio.sleep(backoff(self.policy, attempt, self._rand))

    async def _drive_once(self, live: _Live) -> bool:
        """One pass of phase two; True when the transaction is finished (or all stuck)."""
        while True:
            if live.record.status.committing:
                left = await self._commit_pass(live)
                if left is None:
                    return True
            else:
                # one at a time, newest first, and never past a failure or a stuck branch: a
                # Saga's earlier steps are compensated only after every later one has been
                unfinished = [b for b in live.branches if not b.status.phase_two_done]
                for branch in sorted(unfinished, key=lambda b: b.seq, reverse=True):
                    if branch.stuck or not await self._call(live, branch, False):
                        break
                async with live.lock:
                    left = [b for b in live.branches if not b.status.phase_two_done]
                    if not left:
                        await self._set_status(
                            live, transition(live.record.status, Event.PHASE_TWO_DONE)
                        )
                        self._retire(live)
                        return True
                    new = transition(live.record.status, Event.PHASE_TWO_FAILED)
                    if new is not live.record.status:
                        await self._set_status(live, new)
            retryable = [b for b in left if not b.stuck]
            if not retryable:
                log.warning(
                    "phase two halted: every remaining branch is stuck",
                    extra={"xid": live.record.xid, "branches": [b.branch_id for b in left]},
                )
                return True
            await asyncio.sleep(
                backoff(self.policy, min(b.attempts for b in retryable), self._rand)
            )

    async def _commit_pass(self, live: _Live) -> list[BranchRecord] | None:
        """Confirm every pending branch concurrently; returns the branches still unfinished,
        or None when the transaction is finished."""
        pending = [b for b in live.branches if not b.status.phase_two_done and not b.stuck]
        if not pending:  # e.g. an operator settled the last stuck branch by hand
            async with live.lock:
                left = [b for b in live.branches if not b.status.phase_two_done]
                if left:
                    return left
                await self._set_status(live, transition(live.record.status, Event.PHASE_TWO_DONE))
                self._retire(live)
                return None
        outstanding = [len(pending)]
        if len(pending) == 1:  # the common case: no task for gather to wrap it in
            await self._confirm(live, pending[0], outstanding)
        else:
            await asyncio.gather(*(self._confirm(live, b, outstanding) for b in pending))
        if live.record.status.finished:
            return None
        return [b for b in live.branches if not b.status.phase_two_done]

    async def _confirm(self, live: _Live, branch: BranchRecord, outstanding: list[int]) -> None:
        """One confirm and its journalled outcome. Each outcome is written as it comes; the
        pass's last one shares its write with the transaction's new status (one fsync per
        transaction fewer: a crash before it repeats confirms, and they carry their
        Idempotency-Key)."""
        error = await self._attempt(branch, True)
        async with live.lock:
            outstanding[0] -= 1
            index = _index(live.branches, branch.branch_id)
            updated = self._outcome(live.branches[index], True, error)
            record = live.record
            finished = False
            if outstanding[0] == 0:
                others = (b for i, b in enumerate(live.branches) if i != index)
                left = not updated.status.phase_two_done or any(
                    not b.status.phase_two_done for b in others
                )
                status = transition(
                    record.status, Event.PHASE_TWO_FAILED if left else Event.PHASE_TWO_DONE
                )
                if status is not record.status:
                    record = record.with_status(status, self._clock_ms())
                finished = not left
            await self._write([record] if record is not live.record else (), [updated])
            live.branches[index] = updated
            live.record = record
            if finished:
                self._retire(live)
        self._report_stuck(updated, error)

    async def _attempt(self, branch: BranchRecord, commit: bool) -> str | None:
        """One phase-two call: None when done, else why not."""
        if self.ownership is not None:
            await self.ownership.may_drive()  # never call the app on a lease that lapsed
        try:
            error = await self.caller.phase_two(branch, commit)
        except Exception as exc:  # the caller translates; anything left is a failure too
            error = f"{type(exc).__name__}: {exc}"
        self._events.phase_two_call(error is None)
        return error

    def _outcome(self, current: BranchRecord, commit: bool, error: str | None) -> BranchRecord:
        """The branch after one phase-two attempt."""
        attempts = current.attempts + 1
        if error is None:
            done = BranchStatus.PHASE_TWO_COMMITTED if commit else BranchStatus.PHASE_TWO_ROLLBACKED
            return current.after_attempt(done, attempts, self._clock_ms(), None, current.stuck)
        failed = (
            BranchStatus.PHASE_TWO_COMMIT_RETRYABLE
            if commit
            else BranchStatus.PHASE_TWO_ROLLBACK_RETRYABLE
        )
        return current.after_attempt(
            failed, attempts, self._clock_ms(), error[:500], attempts >= self.policy.max_attempts
        )

    async def _call(self, live: _Live, branch: BranchRecord, commit: bool) -> bool:
        """One phase-two call and its journalled outcome; True when the branch is done."""
        error = await self._attempt(branch, commit)
        async with live.lock:
            index = _index(live.branches, branch.branch_id)
            updated = self._outcome(live.branches[index], commit, error)
            await self._write(branches=[updated])
            live.branches[index] = updated
        self._report_stuck(updated, error)
        return error is None

    def _report_stuck(self, branch: BranchRecord, error: str | None) -> None:
        if branch.stuck and error is not None:
            log.error(
                "branch stuck: phase two gave up after %d attempts",
                branch.attempts,
                extra={"xid": branch.xid, "branch_id": branch.branch_id, "error": error},
            )
            self._events.branch_stuck(branch)

    async def _set_status(self, live: _Live, status: GlobalStatus) -> None:
        record = live.record.with_status(status, self._clock_ms())
        await self._write([record])
        live.record = record

    def _retire(self, live: _Live) -> None:
        xid = live.record.xid
        self._live.pop(xid, None)
        if live.record.idempotency_key:
            self._keys.pop(live.record.idempotency_key, None)
        self._finished[xid] = (live.record, list(live.branches))
        while len(self._finished) > _FINISHED_CACHE:
            self._finished.popitem(last=False)
        live.finished = True
        if live.waiters is not None:
            for waiter in live.waiters:
                if not waiter.done():
                    waiter.set_result(None)
            live.waiters = None
        self._events.finished(live.record)
        _end_transaction_span(live.record, len(live.branches))

    # --- operators ----------------------------------------------------------------------------

    def stuck(self) -> list[BranchRecord]:
        return [b for lv in self._live.values() for b in lv.branches if b.stuck]

    def find_branch(self, branch_id: int) -> BranchRecord | None:
        """A live branch by id alone (ids are unique across transactions)."""
        for live in self._live.values():
            for branch in live.branches:
                if branch.branch_id == branch_id:
                    return branch
        return None

    def deadline_ms(self, xid: str) -> int | None:
        """A live transaction's deadline (wall clock, ms since the epoch), when held here: a
        registration's answer tells the branch how long its transaction has left."""
        live = self._live.get(xid)
        return None if live is None else live.record.deadline_ms

    async def skip_branch(self, xid: str, branch_id: int) -> BranchRecord:
        """An operator settled a stuck branch by hand: mark its phase two done without
        calling it again, so the transaction can finish."""
        live = await self._live_or_explain(xid)
        async with live.lock:
            index = next((i for i, b in enumerate(live.branches) if b.branch_id == branch_id), None)
            if index is None:
                raise BranchNotFound(f"no branch {branch_id} in transaction {xid!r}")
            current = live.branches[index]
            done = (
                BranchStatus.PHASE_TWO_COMMITTED
                if live.record.status.committing
                else BranchStatus.PHASE_TWO_ROLLBACKED
            )
            updated = replace(
                current, status=done, stuck=False, updated_ms=self._clock_ms(),
                last_error="skipped by an operator",
            )  # fmt: skip
            await self._write(branches=[updated])
            live.branches[index] = updated
        if live.record.status is not GlobalStatus.BEGIN:
            self._start_driver(live)
        return updated

    async def retry_branch(self, xid: str, branch_id: int) -> BranchRecord:
        """Un-stick a branch: its attempts start again from one."""
        live = await self._live_or_explain(xid)
        async with live.lock:
            index = next((i for i, b in enumerate(live.branches) if b.branch_id == branch_id), None)
            if index is None:
                raise BranchNotFound(f"no branch {branch_id} in transaction {xid!r}")
            updated = replace(live.branches[index], stuck=False, attempts=0)
            await self._write(branches=[updated])
            live.branches[index] = updated
        if live.record.status is not GlobalStatus.BEGIN:
            self._start_driver(live)
        return updated
