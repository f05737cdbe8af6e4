"""Retention: one named task that compacts every store beside the journal.

Every `interval` (a quarter of the retention, between 1 s and 1 h) it asks each store to
drop what is older than `local_coordinator.retention`: the journal (finished transactions
with their branches), the lock store (expired locks), the outbox (stuck decisions nobody
settled) and the participant's fence (phase-two records). Each store deletes in small
batches and gives the space back itself (sidecar/txn/sqlite_file.py); this module only
decides when, counts, and keeps one store's failure from stopping the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.retention")


class Compactable(Protocol):
    async def compact(self, before_ms: int) -> int:
        """Drop what was last changed before `before_ms`; returns how many rows went."""
        ...


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def sweep_interval(retention: float) -> float:
    """Seconds between sweeps: often enough that at most a quarter of the retention's worth
    of old rows waits, never more often than once a second."""
    return max(1.0, min(3600.0, retention / 4))


class Retention:
    def __init__(
        self,
        retention: float,
        *,
        metrics: Metrics | None = None,
        clock_ms: Callable[[], int] = _wall_ms,
        interval: float | None = None,
    ) -> None:
        self.retention_ms = int(retention * 1000)
        self.interval = sweep_interval(retention) if interval is None else interval
        self._metrics = metrics
        self._clock_ms = clock_ms
        self._stores: dict[str, Compactable] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, name: str, store: Compactable) -> None:
        """`name` is a fixed word (journal, locks, outbox, fence): it is a metric label."""
        self._stores[name] = store

    async def sweep(self) -> dict[str, int]:
        """Compact every store once; returns the rows each removed (failed ones absent)."""
        before = self._clock_ms() - self.retention_ms
        removed: dict[str, int] = {}
        for name, store in list(self._stores.items()):
            try:
                removed[name] = count = await store.compact(before)
            except Exception:  # one store's trouble must not keep the others growing
                log.exception("compaction failed", extra={"file": name})
                continue
            if count:
                log.info("compacted", extra={"file": name, "rows": count})
                if self._metrics is not None:
                    self._metrics.compacted.labels(name).inc(count)
        return removed

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._forever(), name="retention")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.sweep()
