"""The outbox on a real SQLite file: capped (503 OUTBOX_FULL past outbox_max_items, nothing
kept), its depth a gauge, a decision the cluster refuses kept as stuck (not dropped) until an
operator retries or skips it or the retention passes, and a file from before these columns
read as it was."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.coordinator.outbox import Outbox, OutboxFull, OutboxItemNotFound
from sidecar.errors import CoordinatorUnavailable, TransactionNotFound
from sidecar.metrics import Metrics

XID = "10.0.0.9:17020:{}"


class Cluster:
    """The cluster as the outbox sees it: down, refusing, or accepting."""

    def __init__(self) -> None:
        self.mode = "down"
        self.sent: list[tuple[str, bool]] = []

    async def send(self, xid: str, commit: bool) -> str:
        self.sent.append((xid, commit))
        if self.mode == "down":
            raise CoordinatorUnavailable("connection refused")
        if self.mode == "refuse":
            raise TransactionNotFound(f"coordinator: no transaction {xid!r}")
        return "Committed" if commit else "Rollbacked"


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


@pytest.fixture
async def outbox(tmp_path: Path, cluster: Cluster) -> AsyncIterator[Outbox]:
    box = Outbox(str(tmp_path / "j.outbox"), cluster.send, max_items=3, metrics=Metrics())
    await box.open()
    yield box
    await box.close()


async def stuck(box: Outbox, count: int) -> None:
    """Wait until the delivery task has found `count` decisions refused."""

    async def poll() -> None:
        while len(await box.items("stuck")) < count:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), 5)


def depth(box: Outbox) -> float | None:
    assert box._metrics is not None
    return box._metrics.registry.get_sample_value("gts_sidecar_outbox_depth")


async def test_past_the_cap_a_decision_is_refused_and_nothing_is_kept(outbox: Outbox) -> None:
    for n in range(3):
        await outbox.record(XID.format(n), True, "down")
    assert depth(outbox) == 3
    with pytest.raises(OutboxFull) as caught:
        await outbox.record(XID.format(3), True, "connection refused")
    err = caught.value
    assert (err.status, err.code) == (503, "OUTBOX_FULL")
    assert "outbox_max_items" in err.message and XID.format(3) in err.message
    assert [x for x, _ in await outbox.pending()] == [XID.format(n) for n in range(3)]
    assert depth(outbox) == 3
    assert outbox._metrics is not None
    assert outbox._metrics.registry.get_sample_value("gts_sidecar_outbox_refused_total") == 1
    # the same XID again (a rollback after a commit, a retry) replaces its decision: no growth
    await outbox.record(XID.format(0), False, "down")
    assert (XID.format(0), False) in await outbox.pending()


async def test_a_refused_decision_is_kept_as_stuck_then_retried(
    outbox: Outbox, cluster: Cluster, tmp_path: Path
) -> None:
    cluster.mode = "refuse"
    await outbox.record(XID.format(1), True)
    await stuck(outbox, 1)
    [item] = await outbox.items()
    assert (item.state, item.attempts) == ("stuck", 1)
    assert item.last_error is not None and "TRANSACTION_NOT_FOUND" in item.last_error
    assert await outbox.pending() == []  # not re-sent by itself
    assert depth(outbox) == 1

    # it survives a restart
    await outbox.close()
    again = Outbox(str(tmp_path / "j.outbox"), cluster.send, metrics=Metrics())
    await again.open()
    try:
        assert [i.state for i in await again.items("stuck")] == ["stuck"]
        assert again.depth == 1
        cluster.mode = "accept"
        sent = len(cluster.sent)
        assert (await again.retry(XID.format(1))).state == "pending"

        async def delivered() -> None:  # the delivery task re-sends it now (woken by retry)
            while again.depth:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(delivered(), 5)
        assert cluster.sent[sent:] == [(XID.format(1), True)]
        assert await again.items() == []
    finally:
        await again.close()


async def test_skip_forgets_and_unknown_items_are_404(outbox: Outbox, cluster: Cluster) -> None:
    cluster.mode = "refuse"
    await outbox.record(XID.format(2), False)
    await stuck(outbox, 1)
    skipped = await outbox.skip(XID.format(2))
    assert (skipped.xid, skipped.commit, skipped.state) == (XID.format(2), False, "stuck")
    assert await outbox.items() == [] and depth(outbox) == 0
    with pytest.raises(OutboxItemNotFound) as caught:
        await outbox.skip(XID.format(2))
    assert (caught.value.status, caught.value.code) == (404, "OUTBOX_ITEM_NOT_FOUND")
    with pytest.raises(OutboxItemNotFound):
        await outbox.retry("10.0.0.9:17020:404")


async def test_retention_removes_stuck_items_only(tmp_path: Path, cluster: Cluster) -> None:
    now = [1_000]
    box = Outbox(
        str(tmp_path / "j.outbox"), cluster.send, metrics=Metrics(), clock_ms=lambda: now[0]
    )
    await box.open()
    try:
        cluster.mode = "refuse"
        for n in range(5):
            await box.record(XID.format(n), True)
        await stuck(box, 5)  # all five stuck at t=1000
        cluster.mode = "down"
        now[0] = 2_000
        await box.record(XID.format(9), True)  # pending, and newer
        await box.retry(XID.format(4))  # pending again
        assert await box.compact(1_500) == 4
        assert {(i.xid, i.state) for i in await box.items()} == {
            (XID.format(4), "pending"),
            (XID.format(9), "pending"),
        }
        assert box.depth == 2 and depth(box) == 2
        assert box.last_compaction.rows == 4
    finally:
        await box.close()


async def test_a_file_from_before_the_stuck_columns_opens_with_its_decisions(
    tmp_path: Path, cluster: Cluster
) -> None:
    path = tmp_path / "old.outbox"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE decisions (xid TEXT PRIMARY KEY, commit_ INTEGER NOT NULL, "
        "created_ms INTEGER NOT NULL)"
    )
    conn.execute("INSERT INTO decisions VALUES (?, 1, 5)", (XID.format(7),))
    conn.commit()
    conn.close()
    box = Outbox(str(path), cluster.send, metrics=Metrics())
    await box.open()
    try:
        assert await box.pending() == [(XID.format(7), True)]
        assert box.depth == 1
    finally:
        await box.close()


async def test_in_memory_outbox_has_the_same_rules(cluster: Cluster) -> None:
    box = Outbox(None, cluster.send, max_items=1)
    await box.open()
    try:
        cluster.mode = "refuse"
        await box.record(XID.format(1), True)
        with pytest.raises(OutboxFull):
            await box.record(XID.format(2), True)
        await stuck(box, 1)
        assert [i.state for i in await box.items()] == ["stuck"]
        assert await box.compact(10**15) == 1 and box.depth == 0
    finally:
        await box.close()
