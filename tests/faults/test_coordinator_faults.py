"""The coordinator cluster down, slow or flapping, through the fault proxy between a real
sidecar process and a real coordinator process (README: degraded mode)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from tests.faults.cluster import TERMINAL, Cluster, cluster
from tests.faults.faultproxy import Flapping, Mode
from tests.faults.util import wait_until

CALL_TIMEOUT = 1.0  # coordinator.timeouts.request in cluster()
MARGIN = 4.0  # generous: process scheduling on a loaded 2-core machine


async def try_branch(c: Cluster, xid: str) -> Any:
    async with c.session.post(c.inbound + "/try", headers={"XID": xid}, data=b"{}") as r:
        await r.read()
        return r


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param((None, 0.0), id="down-refused"),  # nothing listens
        pytest.param((Mode.RESET, 0.0), id="down-reset"),
        pytest.param((Mode.BLACKHOLE, 0.0), id="down-blackhole"),
        pytest.param((Mode.LATENCY, 3.0), id="slow"),
    ],
)
async def test_cluster_down_or_slow_degrades_then_hands_back(
    tmp_path: Path, aiohttp_server: Any, fault: tuple[Mode | None, float]
) -> None:
    mode, latency = fault
    loop = asyncio.get_running_loop()
    async with cluster(tmp_path, aiohttp_server) as c:
        status, body = await c.begin()
        assert status == 200 and body["xid"].startswith(c.cluster_owner)
        decided, registering = body["xid"], (await c.begin())[1]["xid"]
        assert await c.metric("gts_sidecar_degraded") == 0
        accepted_before = c.proxy.accepted

        if mode is None:
            await c.proxy.stop_listening()
        else:
            c.proxy.set_mode(mode, latency_up=latency)  # LATENCY: calls reach it late
        t0 = loop.time()
        status, body = await c.begin()
        assert loop.time() - t0 < CALL_TIMEOUT + MARGIN  # failed over within the call timeout
        assert status == 200, body  # the app sees no error
        local = body["xid"]
        assert local.startswith(c.own_owner)
        assert await c.metric("gts_sidecar_degraded") == 1
        assert await c.metric("gts_sidecar_degraded_begins_total") >= 1
        if mode in (Mode.RESET, Mode.BLACKHOLE):
            assert c.proxy.accepted > accepted_before  # the fault was met

        # a branch of a cluster-owned XID: refused, with Retry-After, never forwarded
        r = await try_branch(c, registering)
        assert r.status == 503
        assert r.headers["x-gts-sidecar-error"] == "COORDINATOR_UNAVAILABLE"
        assert int(r.headers["Retry-After"]) >= 1
        assert not c.ledger.tried

        # a branch of the local transaction, committed locally to the end
        r = await try_branch(c, local)
        assert r.status == 200
        r = await c.decide(local)
        assert r.status == 200
        await wait_until(lambda: c.status(local), timeout=10, what="local status")
        assert await c.status(local) in ("Committed", "Committing")

        # a decision for a cluster-owned XID: journalled, 503, outcome Unknown
        t0 = loop.time()
        r = await c.decide(decided)
        assert loop.time() - t0 < CALL_TIMEOUT + MARGIN
        assert r.status == 503
        assert r.headers["x-gts-sidecar-error"] == "COORDINATOR_UNAVAILABLE"
        assert r.headers["x-gts-transaction-status"] == "Unknown"

        if mode is None:
            await c.proxy.resume_listening()
        c.proxy.set_mode(Mode.PASS)  # the cluster returns: the journalled commit is re-sent

        async def delivered() -> bool:
            return await c.status(decided) == "Committed"

        await wait_until(delivered, timeout=30, what="outbox re-sent the commit")

        async def handed_back() -> bool:
            status, body = await c.begin()
            return status == 200 and body["xid"].startswith(c.cluster_owner)

        await wait_until(handed_back, timeout=20, what="new begins go to the cluster again")
        assert await c.metric("gts_sidecar_degraded") == 0
        # the local branch's confirm ran once
        await wait_until(lambda: c.ledger.calls, timeout=10, what="confirm")
        assert dict(c.ledger.calls) == {(local, next(iter(c.ledger.tried))[1], "confirm"): 1}
        assert mode is None or c.proxy.by_mode[mode.value] >= 1


@pytest.mark.parametrize(
    "fault",
    [
        # calls fail before reaching the coordinator
        pytest.param(Mode.RESET, id="reset"),
        # calls reach the coordinator and take effect, but the answer is lost
        pytest.param(Mode.LOSE_ANSWER, id="answer-lost"),
    ],
)
async def test_flapping_cluster_every_acknowledged_transaction_ends_terminal_once(
    tmp_path: Path, aiohttp_server: Any, fault: Mode
) -> None:
    rng = random.Random(1125)
    async with cluster(tmp_path, aiohttp_server) as c:
        c.proxy.set_mode(Flapping(fault, period=0.1))
        begun: list[str] = []
        acked: dict[str, bool] = {}  # xid -> commit asked
        unknown: set[str] = set()

        async def worker(n: int) -> None:
            i = 0
            # at least 12 each, and on until the cluster has flapped a few times
            while i < 12 or (c.proxy.by_mode[fault.value] < 5 and i < 300):
                i += 1
                status, body = await c.begin(f"w{n}-{i}", timeout="20s")
                assert status == 200, body  # a begin never fails: cluster or local
                xid = body["xid"]
                begun.append(xid)
                r = await try_branch(c, xid)
                commit = r.status == 200 and rng.random() < 0.7
                if r.status != 200:
                    assert r.status == 503, r.status
                    assert r.headers["x-gts-sidecar-error"] == "COORDINATOR_UNAVAILABLE"
                d = await c.decide(xid, commit)
                if d.status == 200:
                    acked[xid] = commit
                else:
                    assert d.status == 503, d.status
                    assert d.headers["x-gts-transaction-status"] == "Unknown"
                    unknown.add(xid)

        await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(4))), 120)
        assert c.proxy.by_mode[fault.value] >= 1 and c.proxy.by_mode["pass"] >= 1
        owners = {x.rsplit(":", 1)[0] + ":" for x in begun}
        assert owners == {c.cluster_owner, c.own_owner}, owners  # both kinds were exercised
        c.proxy.set_mode(Mode.PASS)

        async def all_terminal() -> bool:
            for xid in begun:
                if await c.status(xid) not in TERMINAL:
                    return False
            return True

        await wait_until(all_terminal, timeout=60, what="every transaction terminal")
        final = {xid: await c.status(xid) for xid in begun}
        for xid, commit in acked.items():
            assert final[xid] == ("Committed" if commit else "Rollbacked"), (xid, final[xid])

        def phases_done() -> bool:
            return all(c.ledger.phases(x, b) for x, b in c.ledger.tried)

        await wait_until(phases_done, timeout=30, what="phase two of every branch")
        for xid, branch in c.ledger.tried:
            phases = c.ledger.phases(xid, branch)
            want = "confirm" if final[xid] == "Committed" else "cancel"
            assert phases == {want: 1}, (xid, branch, final[xid], phases)


async def test_answers_lost_on_the_way_back_from_the_coordinator(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    """The coordinator takes a branch registration and a commit, but their answers are lost
    (RST after the request went through). The try is refused and never forwarded; the phantom
    branch is cancelled without calling the app; the commit, answered Unknown and journalled,
    is re-sent and the branch is confirmed exactly once."""
    async with cluster(tmp_path, aiohttp_server) as c:
        status, body = await c.begin()
        assert status == 200
        committed = body["xid"]
        assert (await try_branch(c, committed)).status == 200
        status, body = await c.begin()
        rolled = body["xid"]
        assert rolled.startswith(c.cluster_owner)

        # the pooled connection too: its next request goes through, its answer is lost
        c.proxy.set_mode(Mode.LOSE_ANSWER, cut_existing=False)
        r = await c.decide(committed)
        assert r.status == 503
        assert r.headers["x-gts-transaction-status"] == "Unknown"
        assert c.proxy.answers_lost == 1  # it did reach the coordinator

        async def register_reached_the_coordinator() -> bool:
            r = await try_branch(c, rolled)
            assert r.status == 503
            assert r.headers["x-gts-sidecar-error"] == "COORDINATOR_UNAVAILABLE"
            return c.proxy.answers_lost >= 2  # past the breaker's probe delay

        await wait_until(register_reached_the_coordinator, timeout=10)
        assert {x for x, _ in c.ledger.tried} == {committed}  # the try was never forwarded

        c.proxy.set_mode(Mode.PASS)

        async def rolled_back() -> bool:
            return (await c.decide(rolled, commit=False)).status == 200

        await wait_until(rolled_back, timeout=10)

        async def final(xid: str, want: str) -> bool:
            return await c.status(xid) == want

        await wait_until(lambda: final(rolled, "Rollbacked"), timeout=20)
        await wait_until(lambda: final(committed, "Committed"), timeout=30, what="outbox")
        await wait_until(lambda: c.ledger.calls, timeout=10, what="confirm")
        ((branch_committed,),) = [[b for x, b in c.ledger.tried if x == committed]]
        assert dict(c.ledger.calls) == {(committed, branch_committed, "confirm"): 1}
        async with c.session.get(f"{c.api}/{rolled}") as resp:
            branches = (await resp.json())["branches"]
        assert len(branches) == 1  # the phantom branch, registered with the coordinator
        assert "Rollbacked" in branches[0]["status"]  # cancelled: an empty rollback
