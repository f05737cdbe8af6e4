"""The standalone coordinator SIGKILLed (or SIGTERMed: it drains and exits 0) mid phase two,
with real sidecar processes as TCC participants, three times under load, restarted each time
on its journal: every transaction ends terminal, every acknowledged decision is the outcome,
and each branch's confirm or cancel reaches its app exactly once (the coordinator re-drives
phase two after a restart; the participant's fence answers the repeats). tests/integration
has the single-branch, no-sidecar version (test_coordinator_e2e) and the sidecar-crash
versions (test_crash_recovery, test_lifecycle)."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.faults.cluster import FAST_PHASE_TWO, TCC, TERMINAL, Ledger
from tests.faults.procs import Coordinator, signing, start_sidecar, write_config
from tests.faults.util import wait_until
from tests.integration.proc import SidecarProcess

ROUNDS = 3


class SlowLedger(Ledger):
    """Phase two takes a moment at the app, so a kill can land while calls are in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.inflight: list[str] = []  # XIDs whose phase-two call the app is handling

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/try":
            return await super().handle(request)
        xid = request.headers.get("XID", "")
        self.inflight.append(xid)
        try:
            await asyncio.sleep(0.02)  # the app's own latency, not synchronisation
            return await super().handle(request)
        finally:
            self.inflight.remove(xid)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_coordinator_killed_mid_phase_two_with_sidecar_participants(
    tmp_path: Path, aiohttp_server: Any, sig: int
) -> None:
    rng = random.Random(20261125)
    coordinator = await Coordinator(tmp_path / "coordinator", phase_two=FAST_PHASE_TWO).start()
    ledgers = [SlowLedger(), SlowLedger()]
    sidecars: list[SidecarProcess] = []
    try:
        for i, ledger in enumerate(ledgers):
            app = web.Application()
            app.router.add_post("/{tail:.*}", ledger.handle)
            server = await aiohttp_server(app)
            d = tmp_path / f"sidecar{i}"
            d.mkdir()
            cfg = {
                "app": {"url": f"http://127.0.0.1:{server.port}"},
                "coordinator": {
                    "endpoints": [coordinator.url],
                    "signing": signing(tmp_path),
                    "breaker": {"failures": 1, "reset": "200ms"},
                    "timeouts": {"connect": "300ms", "request": "1s"},
                },
                "local_coordinator": {
                    "journal": f"sqlite:///{d.resolve()}/journal.db",
                    "phase_two": FAST_PHASE_TWO,
                },
                "tcc": TCC,
            }
            sidecars.append(await start_sidecar(write_config(d / "sidecar.yaml", cfg)))
        a, b = sidecars
        api = f"http://127.0.0.1:{a.ports['api']}/v1/transactions"
        inbounds = [f"http://127.0.0.1:{sc.ports['inbound']}/try" for sc in sidecars]
        begun: list[str] = []
        acked: dict[str, bool] = {}
        stop = asyncio.Event()

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:

            async def worker(n: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    async with s.post(api, json={"name": f"w{n}-{i}", "timeout": "30s"}) as r:
                        assert r.status == 200, await r.text()
                        xid = (await r.json())["xid"]
                    begun.append(xid)
                    ok = True
                    for url in inbounds:
                        async with s.post(url, headers={"XID": xid}, data=b"{}") as r:
                            await r.read()
                            ok = ok and r.status == 200
                    commit = ok and rng.random() < 0.7
                    verb = "commit" if commit else "rollback"
                    async with s.post(f"{api}/{xid}/{verb}") as r:
                        await r.read()
                        if r.status == 200:
                            acked[xid] = commit
                        else:
                            assert r.status == 503, (r.status, r.headers)
                            assert r.headers["x-gts-transaction-status"] == "Unknown"

            owner = coordinator.url.removeprefix("http://") + ":"

            def cluster_phase_two_in_flight() -> bool:
                return any(x.startswith(owner) for led in ledgers for x in led.inflight)

            workers = [asyncio.ensure_future(worker(n)) for n in range(4)]
            try:
                for _ in range(ROUNDS):
                    # a phase-two call the coordinator drives is at an app: kill -9 right then
                    await wait_until(
                        cluster_phase_two_in_flight,
                        timeout=30,
                        what="the coordinator's phase two in flight",
                    )
                    rc = await coordinator.kill(sig)
                    assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
                    await coordinator.start()  # same journal, same port
                    if sig == signal.SIGKILL:  # (a drain may have finished them all)
                        assert coordinator.resumed >= 1  # unfinished transactions came back
                # and on until begins have gone back to the cluster (hand-back) for a while
                mark = len(begun)
                await wait_until(
                    lambda: sum(x.startswith(owner) for x in begun[mark:]) >= 10,
                    timeout=30, what="begins back at the cluster",
                )  # fmt: skip
                stop.set()
                await asyncio.wait_for(asyncio.gather(*workers), 60)
            finally:
                stop.set()
                for w in workers:
                    w.cancel()

            assert len(begun) >= 20

            async def status(xid: str) -> str | None:
                async with s.get(f"{api}/{xid}") as r:
                    return str((await r.json())["status"]) if r.status == 200 else None

            async def all_terminal() -> bool:
                return all([await status(x) in TERMINAL for x in begun])

            await wait_until(all_terminal, timeout=60, what="every transaction terminal")
            final = {x: await status(x) for x in begun}
            for xid, commit in acked.items():
                assert final[xid] == ("Committed" if commit else "Rollbacked"), xid

            def phase_two_done() -> bool:
                return all(x.phases(*t) for x in ledgers for t in x.tried)

            await wait_until(phase_two_done, timeout=30, what="phase two at the apps")
            for ledger in ledgers:
                for xid, branch in ledger.tried:
                    want = "confirm" if final[xid] == "Committed" else "cancel"
                    assert ledger.phases(xid, branch) == {want: 1}, (xid, branch, final[xid])
            # confirm/cancel never reached an app for a branch whose try it never saw
            for ledger in ledgers:
                assert {(x, br) for x, br, _ in ledger.calls} <= ledger.tried
    finally:
        for sc in sidecars:
            await sc.stop()
        await coordinator.stop()
