"""The journal cannot be written (the file-size limit of the process set to one byte, which
even root cannot write past): new transactions are refused with 503 JOURNAL_UNAVAILABLE,
readiness goes false, plain proxy traffic continues, and nothing is corrupted — once writes
work again, so do transactions, and earlier ones are intact."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.integration.proc import start_sidecar, write_config


def prlimit(pid: int, fsize: str) -> None:
    # util-linux's prlimit: part of every Debian system, so never skipped
    assert shutil.which("prlimit"), "prlimit (util-linux) is required"
    subprocess.run(["prlimit", f"--pid={pid}", f"--fsize={fsize}"], check=True)


async def test_journal_unwritable(tmp_path: Path, aiohttp_server) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    server = await aiohttp_server(app)
    cfg = write_config(
        tmp_path / "sidecar.yaml", {"app": {"url": f"http://127.0.0.1:{server.port}"}}
    )
    sc = await start_sidecar(cfg)
    api = f"http://127.0.0.1:{sc.ports['api']}/v1/transactions"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(api, json={"name": "before"}) as r:
                before = (await r.json())["xid"]
            prlimit(sc.proc.pid, "1:unlimited")  # the soft limit only: it can be lifted again
            async with s.post(api, json={"name": "during"}) as r:
                assert r.status == 503
                assert r.headers["x-gts-sidecar-error"] == "JOURNAL_UNAVAILABLE"
            async with s.get(f"http://127.0.0.1:{sc.ports['admin']}/readyz") as r:
                assert r.status == 503
                assert "journal unavailable" in " ".join((await r.json())["reasons"])
            async with s.get(f"http://127.0.0.1:{sc.ports['inbound']}/") as r:
                assert r.status == 200 and await r.text() == "hello"  # plain traffic flows

            prlimit(sc.proc.pid, "unlimited:unlimited")

            async def recovered() -> str:
                while True:
                    async with s.post(api, json={"name": "after"}) as r:
                        if r.status == 200:
                            return str((await r.json())["xid"])
                    await asyncio.sleep(0.05)

            after = await asyncio.wait_for(recovered(), 10)
            async with s.get(f"http://127.0.0.1:{sc.ports['admin']}/readyz") as r:
                assert r.status == 200
            for xid, name in ((before, "before"), (after, "after")):
                async with s.get(f"{api}/{xid}") as r:
                    body = await r.json()
                    assert (body["name"], body["status"]) == (name, "Begin")
    finally:
        await sc.stop()
