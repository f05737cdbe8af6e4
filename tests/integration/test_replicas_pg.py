"""A replicated coordinator: three real `gts-sidecar coordinator` processes on one real
PostgreSQL (tests/pg_server.py), driven over signed GTS REST v1.

- every replica answers for every XID (each call may land on another replica);
- SIGKILL of a replica under load: every transaction it drove reaches its final state
  through the others (timeouts included), each branch's phase two applied once;
- SIGSTOP past the lease, then SIGCONT: the paused replica calls nothing it lost;
- PostgreSQL restarted mid-load: 503 and not ready meanwhile, then serving again, and every
  acknowledged commit is in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.errors import CoordinatorUnavailable
from tests.component.gts import xid_path
from tests.faults.util import wait_until
from tests.integration.replicas import FINAL, Participant, Replicas
from tests.pg_server import PgCluster, new_cluster, pg_server  # noqa: F401

pytestmark = pytest.mark.slow

LEASE = 2.0


@contextlib.asynccontextmanager
async def replicas(
    tmp: Path, pg: PgCluster, *, failing: bool, lease: float = LEASE
) -> AsyncIterator[tuple[Replicas, Participant]]:
    participant = await Participant(failing=failing).start()
    rs = Replicas(tmp, pg, pg.create_database(), lease=f"{lease}s")
    try:
        await rs.start()
        yield rs, participant
    finally:
        await rs.close()
        await participant.close()


async def transaction(
    rs: Replicas, p: Participant, at: int, branches: int, *, timeout_ms: int = 60_000
) -> tuple[str, list[str]]:
    """Begin at replica `at`, register and report `branches` branches there."""
    c = rs.clients[at]
    xid = await c.start(timeout_ms=timeout_ms)
    ids = []
    for n in range(branches):
        bid = await c.register(xid, p.url(f"res{n}"), f"res{n}")
        assert (await c.report(xid, bid)).status == 200
        ids.append(bid)
    return xid, ids


async def decide(rs: Replicas, at: int, xid: str, verb: str) -> str:
    reply = await rs.clients[at].call("POST", xid_path(xid, f"/{verb}"), {})
    assert reply.status == 200, reply.raw
    return str(reply.json()["status"])


async def all_final(rs: Replicas, xids: list[str], via: int) -> bool:
    for xid in xids:
        found = await rs.status(xid, via)
        if found is None or found[0] not in FINAL:
            return False
    return True


async def test_every_replica_answers_for_every_xid(tmp_path: Path, pg_server: PgCluster) -> None:  # noqa: F811
    async with replicas(tmp_path, pg_server, failing=False) as (rs, p):
        xid = await rs.clients[0].start()
        assert rs.owner_of(xid) == 0
        # replica 1 takes it over to register, 2 to report
        b1 = await rs.clients[1].register(xid, p.url("stock"), "stock")
        assert (await rs.clients[2].report(xid, b1)).status == 200
        # replica 0 still holds its copy from the begin, without that branch: the fence
        # refuses its write, it reloads, and the second branch goes in after the first
        b2 = await rs.clients[0].register(xid, p.url("pay"), "pay")
        assert (await rs.clients[1].report(xid, b2)).status == 200
        await decide(rs, 2, xid, "commit")
        await wait_until(lambda: all_final(rs, [xid], 0), timeout=20)
        status, branches = await rs.status(xid, 1) or ("", [])
        assert status == "Committed"
        assert [(b["branchId"], b["resourceId"]) for b in branches] == [(b1, "stock"), (b2, "pay")]
        assert dict(p.applied) == {(b1, "commit"): 1, (b2, "commit"): 1}

        # a begin retried at another replica under the same Idempotency-Key is the same one
        start = "/api/v1/transaction/start"
        first = await rs.clients[0].call("POST", start, {"name": "o"}, idempotency_key="k-1")
        again = await rs.clients[2].call("POST", start, {"name": "o"}, idempotency_key="k-1")
        assert first.status == again.status == 200
        assert first.json()["xid"] == again.json()["xid"]
        other = await rs.clients[1].call("POST", start, {"name": "x"}, idempotency_key="k-1")
        assert other.status == 422 and other.error["code"] == "IDEMPOTENCY_KEY_REUSED"

        # a signed request replayed to another replica is refused: the nonces are shared
        body = b'{"name":"replayed"}'
        headers = rs.clients[0].sign("POST", start, body)
        assert (await rs.clients[0].send("POST", start, body, headers)).status == 200
        replay = await rs.clients[1].send("POST", start, body, headers)
        assert replay.status == 401 and replay.error["code"] == "SIGNATURE_INVALID"
        assert "nonce already used" in replay.error["message"]


async def test_sigkill_of_a_replica_under_load(tmp_path: Path, pg_server: PgCluster) -> None:  # noqa: F811
    async with replicas(tmp_path, pg_server, failing=True) as (rs, p):
        # replica 0 drives: commits and rollbacks stuck in phase two (the participant says
        # 503), and transactions left in Begin that must time out
        committed, rolled, pending = [], [], []
        branches: dict[str, list[str]] = {}
        for _ in range(8):
            xid, ids = await transaction(rs, p, 0, 2)
            branches[xid] = ids
            assert await decide(rs, 0, xid, "commit") in ("Committing", "CommitRetrying")
            committed.append(xid)
            xid, ids = await transaction(rs, p, 0, 2)
            branches[xid] = ids
            assert await decide(rs, 0, xid, "rollback") in ("Rollbacking", "RollbackRetrying")
            rolled.append(xid)
            xid, ids = await transaction(rs, p, 0, 1, timeout_ms=4000)
            branches[xid] = ids
            pending.append(xid)
        await wait_until(lambda: len(p.seen) >= 16, timeout=20)  # phase two is being tried

        # load on all three while replica 0 dies
        acked: list[str] = []
        errors: list[str] = []
        stop = asyncio.Event()

        async def load(at: int) -> None:
            while not stop.is_set():
                try:
                    xid = await rs.clients[at].start(timeout_ms=30_000)
                    if await decide(rs, at, xid, "commit") == "Committed":
                        acked.append(xid)
                except (AssertionError, OSError, TimeoutError, aiohttp.ClientError) as exc:
                    if at != 0:  # replica 0 is the one that dies
                        errors.append(repr(exc))
                    return

        workers = [asyncio.ensure_future(load(i)) for i in (0, 1, 2, 1, 2)]
        await wait_until(lambda: len(acked) >= 20, timeout=20)
        await rs.coordinators[0].kill(signal.SIGKILL)
        killed = time.monotonic()
        p.failing = False  # what the dead replica tried was refused: nothing applied yet
        owned = committed + rolled + pending
        await wait_until(lambda: all_final(rs, owned, 1), timeout=30, what="takeover")
        took = time.monotonic() - killed
        stop.set()
        await asyncio.gather(*workers)

        for xid in owned:
            status, _ = await rs.status(xid, 2) or ("", [])
            want = (
                "Committed"
                if xid in committed
                else "Rollbacked"
                if xid in rolled
                else "TimeoutRollbacked"
            )
            assert status == want, (xid, status)
            phase = "commit" if want == "Committed" else "rollback"
            other = "rollback" if phase == "commit" else "commit"
            for bid in branches[xid]:
                assert p.applied[(bid, phase)] == 1, (xid, bid, took)
                assert p.applied[(bid, other)] == 0, (xid, bid)
        # lease + the Begin ones' 4 s timeout, with room for a slow machine
        assert took < LEASE + 4 + 20, took
        assert rs.logged(1, "took over transactions of expired replicas") or rs.logged(
            2, "took over transactions of expired replicas"
        )
        # the others served throughout, and every commit acknowledged is committed
        assert errors == []
        assert len(acked) >= 20
        for xid in acked:
            found = await rs.status(xid, 1 + len(xid) % 2)
            assert found is not None and found[0] == "Committed", xid


async def test_a_replica_paused_past_its_lease_drives_nothing_it_lost(
    tmp_path: Path,
    pg_server: PgCluster,  # noqa: F811
) -> None:
    async with replicas(tmp_path, pg_server, failing=True) as (rs, p):
        xids, branches = [], []
        for _ in range(6):
            xid, ids = await transaction(rs, p, 0, 1)
            assert await decide(rs, 0, xid, "commit") in ("Committing", "CommitRetrying")
            xids.append(xid)
            branches += ids
        await wait_until(lambda: len(p.seen) >= 6, timeout=20)  # replica 0 keeps retrying
        rs.coordinators[0].sp.signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            took_over = "took over transactions of expired replicas"
            await wait_until(lambda: rs.logged(1, took_over) or rs.logged(2, took_over), 20)
            p.failing = False
            await wait_until(lambda: all_final(rs, xids, 1), timeout=20)
        finally:
            resumed = time.monotonic()
            rs.coordinators[0].sp.signal(signal.SIGCONT)  # type: ignore[union-attr]
        # it wakes with its phase-two retries due, finds its lease taken, lets go of everything
        await wait_until(
            lambda: rs.logged(0, "lease lost: another replica took over; joining again"), 20
        )
        # and serves again, on a new lease
        await wait_until(lambda: rs.ready(0), 20)
        fresh = await rs.clients[0].start()
        assert await decide(rs, 0, fresh, "commit") == "Committed"
        late = [(t, b, ph) for t, b, ph in p.seen if t >= resumed and b in branches]
        assert late == []
        assert {b: p.applied[(b, "commit")] for b in branches} == {b: 1 for b in branches}


async def test_postgresql_restarted_mid_load(tmp_path: Path) -> None:
    pg = new_cluster()
    try:
        async with replicas(tmp_path, pg, failing=False, lease=5.0) as (rs, _):
            acked: list[str] = []
            refused: list[tuple[int, str]] = []
            stop = asyncio.Event()

            async def load(at: int) -> None:
                c = rs.clients[at]
                while not stop.is_set():
                    reply = await c.call("POST", "/api/v1/transaction/start", {"name": "o"})
                    if reply.status != 200:
                        refused.append((reply.status, reply.error["code"]))
                        await asyncio.sleep(0.05)
                        continue
                    xid = reply.json()["xid"]
                    reply = await c.call("POST", xid_path(xid, "/commit"), {})
                    if reply.status == 200 and reply.json()["status"] == "Committed":
                        acked.append(xid)
                    elif reply.status != 200:
                        refused.append((reply.status, reply.error["code"]))

            workers = [asyncio.ensure_future(load(i % 3)) for i in range(6)]
            try:
                await wait_until(lambda: len(acked) >= 30, timeout=20)
                pg.stop("fast")
                await wait_until(lambda: refused, timeout=20)
                await wait_until(lambda: _not_ready(rs), timeout=20)
                before = len(acked)
                pg.start()
                await wait_until(lambda: len(acked) >= before + 30, timeout=30)
                await wait_until(lambda: _all_ready(rs), timeout=30)
            finally:
                stop.set()
                await asyncio.gather(*workers, return_exceptions=True)
            assert {code for status, code in refused} <= {"JOURNAL_UNAVAILABLE"}, refused[:5]
            assert all(status == 503 for status, _ in refused)
        # nothing acknowledged is lost
        listed = ",".join(f"'{x}'" for x in acked)
        committed = pg.psql(
            f"SELECT count(*) FROM gts_globals WHERE status = 'Committed' AND xid IN ({listed})",
            rs_db(rs),
        )
        assert int(committed) == len(set(acked))
    finally:
        pg.destroy()


async def _not_ready(rs: Replicas) -> bool:
    return not any([await rs.ready(i) for i in range(3)])


async def _all_ready(rs: Replicas) -> bool:
    return all([await rs.ready(i) for i in range(3)])


def rs_db(rs: Replicas) -> str:
    url = rs.coordinators[0].data["local_coordinator"]["journal"]
    return str(url).rsplit("/", 1)[1]


async def test_the_sidecars_client_fails_over_calls_about_an_xid(
    tmp_path: Path,
    pg_server: PgCluster,  # noqa: F811
) -> None:
    from sidecar import config as configmod
    from sidecar.coordinator.breaker import BreakerState
    from sidecar.coordinator.client import RemoteCoordinator
    from sidecar.coordinator.states import BranchStatus, BranchType
    from sidecar.metrics import Metrics
    from tests.faults.procs import key_file

    async with replicas(tmp_path, pg_server, failing=False) as (rs, p):
        endpoints = [f"http://127.0.0.1:{c.ports['peer']}" for c in rs.coordinators]
        cfg = configmod.parse(
            {
                "coordinator": {
                    "endpoints": endpoints,
                    "signing": {"key_id": "k1", "secret_file": str(key_file(tmp_path))},
                    "breaker": {"failures": 1, "reset": "30s"},
                }
            },
            env={},
        ).coordinator
        client = RemoteCoordinator(cfg, rs.keys, Metrics())
        try:
            state = await client.begin("order", 60_000)
            owner = rs.owner_of(state.xid)
            bid = await client.register(
                state.xid, BranchType.TCC, "stock", p.url("stock"), b"{}", idempotency_key="r1"
            )
            await rs.coordinators[owner].kill(signal.SIGKILL)
            # the XID's own replica is down: another answers for it, and one replica down
            # is not the cluster down
            await client.report(state.xid, bid, BranchStatus.PHASE_ONE_DONE)
            assert client.breaker.state is BreakerState.CLOSED
            assert client._order(state.xid)[-1] == endpoints[owner]  # tried last from now on
            decided = await client.commit(state.xid)
            assert decided.status in ("Committing", "Committed")
            survivor = (owner + 1) % 3
            await wait_until(lambda: all_final(rs, [state.xid], survivor), timeout=20)
            assert dict(p.applied) == {(str(bid), "commit"): 1}
            # every replica down: that is the cluster down (the breaker opens)
            for c in rs.coordinators:
                await c.kill(signal.SIGKILL)
            with pytest.raises(CoordinatorUnavailable):
                await client.status(state.xid)
            assert client.breaker.state is BreakerState.OPEN
        finally:
            await client.close()


async def test_a_replica_stopped_with_sigterm_hands_its_work_over_at_once(
    tmp_path: Path,
    pg_server: PgCluster,  # noqa: F811
) -> None:
    # a lease far longer than the wait below: only the hand-over on exit can meet it
    async with replicas(tmp_path, pg_server, failing=True, lease=60.0) as (rs, p):
        xids, branches = [], []
        for _ in range(4):
            xid, ids = await transaction(rs, p, 0, 1)
            assert await decide(rs, 0, xid, "commit") in ("Committing", "CommitRetrying")
            xids.append(xid)
            branches += ids
        pending, _ = await transaction(rs, p, 0, 1, timeout_ms=3000)
        await wait_until(lambda: len(p.seen) >= 4, timeout=20)
        assert await rs.coordinators[0].kill(signal.SIGTERM) == 0  # drains, then exits
        p.failing = False
        await wait_until(lambda: all_final(rs, [*xids, pending], 1), timeout=20)
        for xid in xids:
            status, _ = await rs.status(xid, 2) or ("", [])
            assert status == "Committed"
        assert (await rs.status(pending, 2) or ("", []))[0] == "TimeoutRollbacked"
        assert {b: p.applied[(b, "commit")] for b in branches} == {b: 1 for b in branches}
