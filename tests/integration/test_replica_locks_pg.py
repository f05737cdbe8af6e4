"""Global locks through a replicated coordinator: real `gts-sidecar coordinator` processes on
one real PostgreSQL (tests/pg_server.py), over signed `/api/v1/locks`. A lock taken through
replica A is refused to another transaction through replica B; after A is SIGKILLed, its
transactions' locks are released by the replicas that end them: a commit and a rollback
decided through the others, and a transaction left in Begin that another replica takes
over once A's lease has expired and rolls back at its timeout."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.component.gts import Reply, SignedClient
from tests.faults.util import wait_until
from tests.integration.test_replicas_pg import decide, replicas
from tests.pg_server import PgCluster, pg_server  # noqa: F401

pytestmark = pytest.mark.slow

LOCKS = "/api/v1/locks"


async def lock(client: SignedClient, xid: str, keys: list[str]) -> Reply:
    return await client.call("POST", LOCKS, {"xid": xid, "keys": keys})


async def holder(client: SignedClient, key: str) -> str | None:
    reply = await client.call("GET", f"{LOCKS}/{key}")
    assert reply.status == 200, reply.raw
    found = reply.json()["holder"]
    return None if found is None else str(found)


async def test_locks_are_shared_and_released_by_the_replicas_that_end_the_transactions(
    tmp_path: Path,
    pg_server: PgCluster,  # noqa: F811
) -> None:
    async with replicas(tmp_path, pg_server, failing=False) as (rs, _):
        a, b, c = rs.clients
        to_commit = await a.start()
        to_roll_back = await a.start()
        left_in_begin = await a.start(timeout_ms=3000)
        for xid, keys in (
            (to_commit, ["orders:1", "stock:sku-42"]),
            (to_roll_back, ["orders:2"]),
            (left_in_begin, ["pay:9"]),
        ):
            assert (await lock(a, xid, keys)).status == 200

        # another transaction, through another replica: refused, all or nothing
        other = await b.start()
        refused = await lock(b, other, ["stock:sku-7", "stock:sku-42"])
        assert refused.status == 409, refused.raw
        assert refused.error["code"] == "LOCK_CONFLICT"
        assert refused.error["holder"] == to_commit
        assert await holder(c, "stock:sku-7") is None
        assert await holder(c, "stock:sku-42") == to_commit
        # a transaction this cluster does not know cannot lock
        unknown = await lock(b, "10.9.9.9:17020:1", ["orders:3"])
        assert unknown.status == 404 and unknown.error["code"] == "TRANSACTION_NOT_FOUND"

        assert await rs.coordinators[0].kill(signal.SIGKILL) is not None
        assert await decide(rs, 1, to_commit, "commit") == "Committed"
        assert await decide(rs, 2, to_roll_back, "rollback") == "Rollbacked"
        assert await holder(b, "stock:sku-42") is None
        assert await holder(c, "orders:1") is None
        assert await holder(b, "orders:2") is None
        assert (await lock(b, other, ["stock:sku-7", "stock:sku-42"])).status == 200
        # a finished transaction takes no new locks
        late = await lock(c, to_commit, ["orders:4"])
        assert late.status == 409 and late.error["code"] == "TRANSACTION_NOT_ACTIVE"

        # the one left in Begin: taken over when A's lease expires, rolled back at its
        # timeout, and its lock goes with it
        assert await holder(b, "pay:9") == left_in_begin

        async def rolled_back() -> bool:
            found = await rs.status(left_in_begin, 1)
            return found is not None and found[0] == "TimeoutRollbacked"

        await wait_until(rolled_back, timeout=30)
        assert await holder(c, "pay:9") is None
