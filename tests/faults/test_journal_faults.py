"""The journal's disk full (a small tmpfs mounted by the test) or its writes and fsyncs failing
(libfiu): new transactions refused with 503 JOURNAL_UNAVAILABLE, /readyz false, plain proxy
traffic goes on, nothing acknowledged is lost or corrupted, and transactions work again once
the fault is gone. (tests/integration/test_journal_unavailable.py has the RLIMIT_FSIZE case.)"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.faults.procs import start_sidecar, write_config
from tests.faults.util import require_tool, wait_until
from tests.integration.proc import SidecarProcess


@dataclass
class Env:
    sc: SidecarProcess
    s: aiohttp.ClientSession

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.sc.ports['api']}/v1/transactions"

    async def begin(self, name: str) -> tuple[int, dict[str, Any], dict[str, Any]]:
        async with self.s.post(self.api, json={"name": name}) as r:
            return r.status, dict(r.headers), await r.json(content_type=None)

    async def ready(self) -> tuple[int, Any]:
        async with self.s.get(f"http://127.0.0.1:{self.sc.ports['admin']}/readyz") as r:
            return r.status, await r.json(content_type=None)

    async def plain(self) -> None:
        async with self.s.get(f"http://127.0.0.1:{self.sc.ports['inbound']}/") as r:
            assert r.status == 200 and await r.text() == "hello"

    async def check_refused(self) -> None:
        status, headers, body = await self.begin("during")
        assert status == 503, body
        assert headers["x-gts-sidecar-error"] == "JOURNAL_UNAVAILABLE"
        rstatus, rbody = await self.ready()
        assert rstatus == 503
        assert "journal unavailable" in " ".join(rbody["reasons"])
        await self.plain()  # plain proxy traffic goes on

    async def recovered(self) -> str:
        async def ok() -> str | None:
            status, _, body = await self.begin("after")
            return str(body["xid"]) if status == 200 else None

        xid = str(await wait_until(ok, timeout=15, what="begins work again"))
        await wait_until(lambda: asyncio.ensure_future(self._ready200()), timeout=10)
        return xid

    async def _ready200(self) -> bool:
        return (await self.ready())[0] == 200

    async def intact(self, xids: dict[str, str]) -> None:
        for xid, want in xids.items():
            async with self.s.get(f"{self.api}/{xid}") as r:
                assert r.status == 200, xid
                assert (await r.json())["status"] == want, xid


async def hello_app(aiohttp_server: Any) -> str:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


def integrity_ok(db: Path) -> None:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        con.close()


@pytest.fixture
async def tmpfs(tmp_path: Path) -> AsyncIterator[Path]:
    """A 2 MiB tmpfs, mounted for the test (root; CI runs as root) and unmounted after."""
    require_tool("mount", "mount")
    assert os.geteuid() == 0, "mounting a tmpfs needs root (CI runs the suite as root)"
    mnt = tmp_path / "jfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
                   check=True)  # fmt: skip
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write to `path` until the filesystem is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass


async def test_journal_disk_full(tmp_path: Path, tmpfs: Path, aiohttp_server: Any) -> None:
    db = tmpfs / "journal.db"
    cfg = {
        "app": {"url": await hello_app(aiohttp_server)},
        "local_coordinator": {"journal": f"sqlite:///{db}"},
    }
    sc = await start_sidecar(write_config(tmp_path / "sidecar.yaml", cfg))
    try:
        async with aiohttp.ClientSession() as s:
            env = Env(sc, s)
            acknowledged: dict[str, str] = {}
            for i in range(5):
                status, _, body = await env.begin(f"before-{i}")
                assert status == 200
                acknowledged[body["xid"]] = "Begin"
            filler = tmpfs / "filler"
            fill(filler)
            # the WAL may still have room in pages it already owns: keep beginning until the
            # journal has to grow; every begin answered 200 must survive
            refused = False
            for i in range(3000):
                status, headers, body = await env.begin(f"filling-{i}")
                if status == 200:
                    acknowledged[body["xid"]] = "Begin"
                    continue
                assert status == 503, body
                assert headers["x-gts-sidecar-error"] == "JOURNAL_UNAVAILABLE"
                refused = True
                break
            assert refused, "the journal never ran out of space"
            await env.check_refused()

            filler.unlink()  # space returns
            acknowledged[await env.recovered()] = "Begin"
            await env.intact(acknowledged)
        sc.signal(15)
        assert await sc.wait(30) == 0
        integrity_ok(db)
    finally:
        await sc.stop()


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param("enable name=posix/io/sync/*,failinfo=5", id="fsync-EIO"),
        pytest.param("enable name=posix/io/rw/pwrite*,failinfo=28", id="pwrite-ENOSPC"),
    ],
)
async def test_journal_write_or_fsync_failing(
    tmp_path: Path, aiohttp_server: Any, fault: str
) -> None:
    fiu_run = require_tool("fiu-run", "fiu-utils")
    fiu_ctrl = require_tool("fiu-ctrl", "fiu-utils")
    assert Path("/usr/lib/fiu/fiu_posix_preload.so").exists(), "install the package 'libfiu0'"
    ctrl = str(tmp_path / "fiu")
    db = tmp_path / "journal.db"
    cfg = {
        "app": {"url": await hello_app(aiohttp_server)},
        "local_coordinator": {"journal": f"sqlite:///{db}"},
    }
    sc = await start_sidecar(
        write_config(tmp_path / "sidecar.yaml", cfg), prefix=[fiu_run, "-x", "-f", ctrl]
    )
    pid = sc.proc.pid

    def control(command: str) -> None:
        subprocess.run([fiu_ctrl, "-f", ctrl, "-c", command, str(pid)], check=True, timeout=10)

    try:
        async with aiohttp.ClientSession() as s:
            env = Env(sc, s)
            acknowledged: dict[str, str] = {}
            for i in range(5):
                status, _, body = await env.begin(f"before-{i}")
                assert status == 200
                acknowledged[body["xid"]] = "Begin"
            async with s.post(f"{env.api}/{next(iter(acknowledged))}/commit") as r:
                assert (await r.json())["status"] == "Committed"
            acknowledged[next(iter(acknowledged))] = "Committed"

            control(fault)
            await env.check_refused()
            status, _, _ = await env.begin("again")  # still refused while failing
            assert status == 503
            # a decision that cannot be journalled is not acknowledged either
            pending = list(acknowledged)[1]
            async with s.post(f"{env.api}/{pending}/commit") as r:
                assert r.status == 503, await r.text()
                assert r.headers["x-gts-sidecar-error"] == "JOURNAL_UNAVAILABLE"
            control("disable name=" + fault.split("name=")[1].split(",")[0])

            acknowledged[await env.recovered()] = "Begin"
            await env.intact(acknowledged)  # the refused commit left its transaction as it was
            async with s.post(f"{env.api}/{pending}/commit") as r:
                assert r.status == 200 and (await r.json())["status"] == "Committed"
        sc.signal(15)
        assert await sc.wait(30) == 0
        integrity_ok(db)
    finally:
        await sc.stop()
