"""Metric labels are bounded by names, never by addresses: phase-two callbacks to many
participant addresses share one `upstream` label value, and the retention sweeper labels
by file name."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from sidecar.coordinator.callbacks import POOL_LABEL, HttpBranchCaller
from sidecar.coordinator.records import BranchRecord
from sidecar.coordinator.retention import Retention, sweep_interval
from sidecar.coordinator.signing import KeyRing
from sidecar.coordinator.states import BranchStatus, BranchType
from sidecar.metrics import Metrics
from tests.component.servers import closed_port


def label_values(registry: CollectorRegistry) -> set[str]:
    return {
        value
        for family in registry.collect()
        for sample in family.samples
        for value in sample.labels.values()
    }


async def test_callbacks_to_many_addresses_add_no_series() -> None:
    metrics = Metrics()
    ring = KeyRing(("k1", b"k1-secret-0123456789abcdef0123456789"))
    caller = HttpBranchCaller(ring, timeout=2.0, connect_timeout=1.0, metrics=metrics)
    before = len(list(metrics.registry.collect()))
    try:
        ports = [closed_port() for _ in range(30)]
        for n, port in enumerate(ports):
            branch = BranchRecord(
                branch_id=n + 1,
                xid=f"127.0.0.1:17020:{n}",
                seq=0,
                branch_type=BranchType.TCC,
                resource_id="stock",
                callback_url=f"http://127.0.0.1:{port}/gts/branch",
                application_data=b"{}",
                status=BranchStatus.PHASE_ONE_DONE,
            )
            error = await caller.phase_two(branch, True)
            assert error is not None and str(port) in error  # the message names the target
        values = label_values(metrics.registry)
        assert not [v for v in values if "127.0.0.1" in v or any(str(p) in v for p in ports)]
        series = [
            s.labels
            for f in metrics.registry.collect()
            for s in f.samples
            if s.labels.get("upstream") is not None
        ]
        assert {labels["upstream"] for labels in series} == {POOL_LABEL}
        assert len(list(metrics.registry.collect())) == before
    finally:
        await caller.close()


class Store:
    def __init__(self, removed: int = 0, fail: bool = False) -> None:
        self.removed, self.fail = removed, fail
        self.asked: list[int] = []

    async def compact(self, before_ms: int) -> int:
        self.asked.append(before_ms)
        if self.fail:
            raise OSError("disk on fire")
        return self.removed


async def test_retention_sweeps_every_store_and_survives_one_failing() -> None:
    metrics = Metrics()
    sweeper = Retention(3600.0, metrics=metrics, clock_ms=lambda: 10_000_000)
    journal, broken, outbox = Store(7), Store(fail=True), Store(0)
    sweeper.add("journal", journal)
    sweeper.add("locks", broken)
    sweeper.add("outbox", outbox)
    assert await sweeper.sweep() == {"journal": 7, "outbox": 0}
    assert journal.asked == broken.asked == outbox.asked == [10_000_000 - 3_600_000]
    sample = metrics.registry.get_sample_value
    assert sample("gts_sidecar_compacted_rows_total", {"file": "journal"}) == 7
    assert sweeper.interval == 900.0
    assert (sweep_interval(0.5), sweep_interval(86400 * 30)) == (1.0, 3600.0)
