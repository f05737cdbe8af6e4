"""The journal's writer thread runs under SCHED_BATCH on Linux (it must not preempt the event
loop when a batch is handed over), and only it: the loop's own thread keeps its policy. The
batch that follows is committed as ever."""

from __future__ import annotations

import os
import sys

import pytest

from sidecar.coordinator.journal import SqliteJournal
from sidecar.coordinator.records import GlobalRecord
from sidecar.coordinator.states import GlobalStatus

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's"
)


async def test_the_writer_thread_is_batch_scheduled_and_the_loop_is_not(tmp_path) -> None:
    before = os.sched_getscheduler(0)
    journal = SqliteJournal(str(tmp_path / "journal.db"))
    await journal.open()
    try:
        thread = journal._thread
        assert thread is not None and thread.native_id is not None
        assert os.sched_getscheduler(thread.native_id) == os.SCHED_BATCH
        assert os.sched_getscheduler(0) == before  # the loop's thread is left alone
        record = GlobalRecord(
            xid="10.0.0.1:17020:1",
            name="order",
            status=GlobalStatus.BEGIN,
            timeout_ms=60_000,
            begin_ms=1,
            updated_ms=1,
        )
        await journal.write([record])
        found = await journal.find(record.xid)
        assert found is not None and found[0] == record
    finally:
        await journal.close()
