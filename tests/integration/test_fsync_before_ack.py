"""Durability beyond kill -9: SQLite keeps committed rows across a process crash at every
sync level, so only power loss tells the levels apart. What this shows instead: every
acknowledged begin and commit is preceded by an fsync/fdatasync of the journal — counted
under strace, attached to the real sidecar process."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.integration.proc import start_sidecar, write_config

N = 20


def _strace() -> str:
    path = shutil.which("strace")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("strace is required (scripts/system-deps.sh installs it)")
        pytest.skip("strace not installed")
    return path


async def test_each_acknowledged_begin_and_commit_is_fsynced(tmp_path: Path) -> None:
    strace = _strace()
    sc = await start_sidecar(write_config(tmp_path / "sidecar.yaml", {}))
    trace = tmp_path / "trace.txt"
    tracer = await asyncio.create_subprocess_exec(
        strace, "-f", "-p", str(sc.proc.pid), "-e", "trace=fsync,fdatasync", "-o", str(trace),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert tracer.stderr is not None
    try:
        # strace says when it is attached; only then do the writes count
        line = await asyncio.wait_for(tracer.stderr.readline(), 30)
        assert b"attached" in line, line
        api = f"http://127.0.0.1:{sc.ports['api']}/v1/transactions"
        async with aiohttp.ClientSession() as s:
            for i in range(N):  # one at a time: no two acknowledgements share a commit
                async with s.post(api, json={"name": f"t{i}"}) as r:
                    xid = (await r.json())["xid"]
                async with s.post(f"{api}/{xid}/commit") as r:
                    assert (await r.json())["status"] == "Committed"
    finally:
        tracer.send_signal(signal.SIGINT)  # detach: the sidecar goes on
        await asyncio.wait_for(tracer.wait(), 30)
        await sc.stop()
    syncs = sum(1 for ln in trace.read_text().splitlines() if "sync(" in ln)
    # 2N acknowledgements (N begins, N commits), each only after its own journal commit
    assert syncs >= 2 * N, f"{syncs} fsyncs for {2 * N} acknowledged writes"
