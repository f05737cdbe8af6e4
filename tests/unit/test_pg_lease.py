"""A replica's lease (sidecar/coordinator/pg_lease.py) with its journal and engine faked and
its clock injected: phase two waits for a held lease, a lost lease lets go of everything and
joins again, takeovers reach the engine, a failing database makes the replica not ready."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.coordinator.pg_lease import Replica
from sidecar.coordinator.records import GlobalRecord
from sidecar.coordinator.states import GlobalStatus
from sidecar.errors import JournalUnavailable
from sidecar.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeJournal:
    def __init__(self) -> None:
        self.token: int | None = None
        self.tokens = iter(range(1, 100))
        self.renewals: list[bool | Exception] = []
        self.reaped: list[Any] = []
        self.on_lease_lost: Any = None

    async def join(self, name: str, lease: float) -> int:
        self.token = next(self.tokens)
        return self.token

    async def renew(self, lease: float) -> bool:
        outcome = self.renewals.pop(0) if self.renewals else True
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def reap(self) -> list[Any]:
        found, self.reaped = self.reaped, []
        return found

    async def leave(self) -> None:
        pass


class FakeEngine:
    def __init__(self) -> None:
        self.ownership: Any = None
        self.journal_ok = True
        self.forgotten = 0
        self.resumed: list[Any] = []

    def forget_all(self) -> None:
        self.forgotten += 1

    def resume(self, found: list[Any]) -> int:
        self.resumed += found
        return len(found)


METRICS = Metrics()


def sample(name: str, **labels: str) -> float | None:
    return METRICS.registry.get_sample_value(name, labels)


@pytest.fixture
async def rig() -> tuple[Replica, FakeJournal, FakeEngine, Clock]:
    journal, engine, clock = FakeJournal(), FakeEngine(), Clock()
    replica = Replica(journal, name="r", lease=3.0, clock=clock, metrics=METRICS)  # type: ignore[arg-type]
    await replica.begin(engine)  # type: ignore[arg-type]
    return replica, journal, engine, clock


async def test_phase_two_waits_once_less_than_a_third_of_the_lease_is_left(rig: Any) -> None:
    replica, journal, engine, clock = rig
    assert engine.ownership is replica and journal.token == 1
    clock.now += 1.5  # 1.5 s of 3 left
    await asyncio.wait_for(replica.may_drive(), 1)
    clock.now += 1.0  # 0.5 s left: a pause (SIGSTOP, GC) could outlast it mid-call
    waiting = asyncio.ensure_future(replica.may_drive())
    await asyncio.sleep(0)
    assert not waiting.done()
    await replica._beat()  # renewed now: held until now + 3
    await asyncio.wait_for(waiting, 1)
    assert replica.held_until == clock.now + 3.0


async def test_a_lost_lease_lets_go_of_everything_and_joins_again(rig: Any) -> None:
    replica, journal, engine, clock = rig
    clock.now += 10  # paused far past the lease
    waiting = asyncio.ensure_future(replica.may_drive())
    await asyncio.sleep(0)
    journal.renewals += [False, False]  # its row was reaped: another replica has its work
    journal.join = _failing_join(journal)  # type: ignore[method-assign]
    await replica._beat()  # lets go of everything; joining again fails (database away)
    assert engine.forgotten == 1
    assert sample("gts_sidecar_replica_lease_held") == 0 and not waiting.done()
    await replica._beat()  # the old token is still refused; this time the join works
    assert engine.forgotten == 2
    assert journal.token == 2  # a new fencing token
    await asyncio.wait_for(waiting, 1)  # a new lease: new work may be driven


async def test_takeovers_reach_the_engine(rig: Any) -> None:
    replica, journal, engine, _ = rig
    before = sample("gts_sidecar_replica_takeovers_total", how="expired") or 0
    record = GlobalRecord("h:1:1", "o", GlobalStatus.COMMITTING, 1000, 0, 0)
    journal.reaped = [(record, [])]
    await replica._beat()
    assert engine.resumed == [(record, [])] and replica.takeovers == 1
    assert sample("gts_sidecar_replica_takeovers_total", how="expired") == before + 1


async def test_an_unreachable_database_makes_the_replica_not_ready(rig: Any) -> None:
    replica, journal, engine, clock = rig
    journal.renewals.append(JournalUnavailable("journal unavailable (test)"))
    await replica._beat()
    assert engine.journal_ok is False and engine.forgotten == 0
    assert sample("gts_sidecar_replica_lease_held") == 0
    clock.now += 5
    waiting = asyncio.ensure_future(replica.may_drive())
    await asyncio.sleep(0)
    assert not waiting.done()  # the lease may have lapsed: drive nothing
    await replica._beat()
    assert engine.journal_ok is True
    assert sample("gts_sidecar_replica_lease_held") == 1
    await asyncio.wait_for(waiting, 1)


def _failing_join(journal: FakeJournal) -> Any:
    """join() that fails once (the database away), then works again."""
    real = FakeJournal.join
    calls = [0]

    async def join(name: str, lease: float) -> int:
        calls[0] += 1
        if calls[0] == 1:
            raise JournalUnavailable("journal unavailable (test)")
        return await real(journal, name, lease)

    return join
