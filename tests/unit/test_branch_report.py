"""A failed try's PhaseOne_Failed reaches the coordinator before the app's answer reaches the
caller, through a coordinator that is briefly unreachable (retried), and the answer is not
held forever when it stays unreachable."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from sidecar.coordinator.states import BranchStatus
from sidecar.errors import CoordinatorUnavailable
from sidecar.proxy import branch_filter
from sidecar.proxy.branch_filter import BranchFilter

XID = "10.0.0.1:8091:7"


class Coordinator:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.events: list[str] = []

    async def report(self, xid: str, branch_id: int, status: BranchStatus) -> None:
        if self.failures:
            self.failures -= 1
            self.events.append("refused")
            raise CoordinatorUnavailable("coordinator cluster unavailable for report: refused")
        self.events.append(f"reported {status.value}")


class Exchange:
    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.released = asyncio.Event()

    def release_held_response(self, extra: list[tuple[bytes, bytes]]) -> None:
        self.events.append("released")
        self.released.set()


def branch(coordinator: Coordinator) -> tuple[BranchFilter, Exchange]:
    exchange = Exchange(coordinator.events)
    rule = SimpleNamespace(resource="inventory-deduct")
    bf = BranchFilter(exchange, rule, XID, coordinator, None, "http://x")  # type: ignore[arg-type]
    bf.branch_id = 42
    return bf, exchange


async def test_the_failure_is_reported_before_the_answer_goes_on_even_through_a_restart():
    coordinator = Coordinator(failures=2)
    bf, exchange = branch(coordinator)
    bf.report_failure_then_release()
    await asyncio.wait_for(exchange.released.wait(), 5)
    assert coordinator.events == ["refused", "refused", "reported PhaseOne_Failed", "released"]


async def test_the_answer_is_not_held_past_the_patience(monkeypatch: Any):
    monkeypatch.setattr(branch_filter, "FAILED_REPORT_PATIENCE", 0.3)
    coordinator = Coordinator(failures=1000)
    bf, exchange = branch(coordinator)
    bf.report_failure_then_release()
    await asyncio.wait_for(exchange.released.wait(), 5)
    assert coordinator.events[-1] == "released"
    assert coordinator.events.count("refused") >= 2  # retried, then gave up


@pytest.mark.parametrize("ok", [True, False])
async def test_reports_that_hold_nothing_are_sent_once(ok: bool):
    coordinator = Coordinator(failures=1)
    bf, exchange = branch(coordinator)
    bf.report(ok)
    bf.report(ok)  # once per branch
    await asyncio.gather(*branch_filter._background)  # the report's task, done
    assert coordinator.events == ["refused"]  # not retried: nobody waits for it
    assert not exchange.released.is_set()
