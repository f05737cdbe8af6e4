"""The Redis backends against a real redis-server: idempotency keys, the shared nonce store,
and global locks (atomic acquire under concurrency, TTL safety net, errors)."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sidecar.errors import LockConflict, StoreUnavailable
from sidecar.idempotency import IdempotencyStore, RedisNonceStore
from sidecar.txn.locks import RedisLocks
from tests.redis_server import redis_server, redis_url  # noqa: F401

pytestmark = pytest.mark.redis

A = "10.0.0.1:8091:1"
B = "10.0.0.1:8091:2"
C = "10.0.0.2:8091:3"

#: a bound for TTL polls: ten times the 1 s TTL under test
TTL_BOUND = 10.0


async def _wait_until_gone(
    probe: Callable[[], Awaitable[object]], bound: float = TTL_BOUND
) -> float:
    """Poll the async `probe()` until it returns None; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while await probe() is not None:
        assert loop.time() - start < bound, "the key outlived its TTL"
        await asyncio.sleep(0.05)
    return loop.time() - start


# --- idempotency ---------------------------------------------------------------------------


@pytest.fixture
async def idem(redis_url: str) -> AsyncIterator[IdempotencyStore]:  # noqa: F811
    store = IdempotencyStore.from_url(redis_url, ttl=60)
    yield store
    await store.close()


async def test_idempotency_put_and_get(idem: IdempotencyStore) -> None:
    assert idem.shared and idem.where.startswith("redis://127.0.0.1:")
    assert await idem.get("k") is None
    value = bytes(range(256))  # any bytes, stored as they are
    assert await idem.put_if_absent("k", value)
    assert not await idem.put_if_absent("k", b"other")
    assert await idem.get("k") == value


async def test_idempotency_shared_by_replicas(redis_url: str) -> None:  # noqa: F811
    one = IdempotencyStore.from_url(redis_url)
    two = IdempotencyStore.from_url(redis_url)
    try:
        assert await one.put_if_absent("begin:42", b'{"xid": "x"}')
        assert not await two.put_if_absent("begin:42", b'{"xid": "y"}')
        assert await two.get("begin:42") == b'{"xid": "x"}'
    finally:
        await one.close()
        await two.close()


async def test_idempotency_put_if_absent_atomic_under_concurrency(
    redis_url: str,  # noqa: F811
) -> None:
    replicas = [IdempotencyStore.from_url(redis_url) for _ in range(4)]
    try:
        results = await asyncio.gather(
            *(replicas[i % 4].put_if_absent("same", str(i).encode()) for i in range(200))
        )
        assert results.count(True) == 1
        assert await replicas[0].get("same") == str(results.index(True)).encode()
    finally:
        for store in replicas:
            await store.close()


async def test_idempotency_ttl_expiry(idem: IdempotencyStore) -> None:
    assert await idem.put_if_absent("short", b"v", ttl=1.0)
    assert await idem.get("short") == b"v"
    took = await _wait_until_gone(lambda: idem.get("short"))
    assert took >= 0.5  # not gone at once
    assert await idem.put_if_absent("short", b"again")


# --- nonces --------------------------------------------------------------------------------


async def test_nonce_replay_across_two_stores(redis_url: str) -> None:  # noqa: F811
    one = RedisNonceStore.from_url(redis_url)
    two = RedisNonceStore.from_url(redis_url)
    try:
        assert await one.seen("k1", "ab" * 16, 600) is False
        assert await two.seen("k1", "ab" * 16, 600) is True  # the replay, on another replica
        assert await two.seen("k2", "ab" * 16, 600) is False  # nonces are per key id
        assert await one.seen("k1", "cd" * 16, 600) is False
    finally:
        await one.close()
        await two.close()


async def test_nonce_store_from_idempotency_store(idem: IdempotencyStore, redis_url: str) -> None:  # noqa: F811
    shared = idem.nonce_store()
    other = RedisNonceStore.from_url(redis_url)
    try:
        results = await asyncio.gather(
            *((shared if i % 2 else other).seen("k", "ff" * 16, 600) for i in range(50))
        )
        assert results.count(False) == 1
    finally:
        await other.close()


async def test_nonce_ttl_expiry(redis_url: str) -> None:  # noqa: F811
    store = RedisNonceStore.from_url(redis_url)
    try:
        assert await store.seen("k", "00" * 16, 1.0) is False
        loop = asyncio.get_running_loop()
        start = loop.time()
        while await store.seen("k", "00" * 16, 1.0):
            assert loop.time() - start < TTL_BOUND
            await asyncio.sleep(0.05)
    finally:
        await store.close()


# --- locks ---------------------------------------------------------------------------------


@pytest.fixture
async def locks(redis_url: str) -> AsyncIterator[RedisLocks]:  # noqa: F811
    manager = RedisLocks.from_url(redis_url)
    yield manager
    await manager.close()


async def test_locks_acquire_holder_release(locks: RedisLocks) -> None:
    assert await locks.holder("orders:1") is None
    await locks.acquire(A, ["orders:1", "orders:2"])
    assert await locks.holder("orders:1") == A
    assert await locks.holder("orders:2") == A
    assert await locks.release_all(A) == 2
    assert await locks.release_all(A) == 0
    assert await locks.holder("orders:1") is None


async def test_locks_all_or_nothing_conflict_names_holder(locks: RedisLocks) -> None:
    await locks.acquire(A, ["orders:2"])
    with pytest.raises(LockConflict) as info:
        await locks.acquire(B, ["orders:1", "orders:2", "orders:3"])
    assert (info.value.key, info.value.holder) == ("orders:2", A)
    assert A in info.value.message
    assert await locks.holder("orders:1") is None
    assert await locks.holder("orders:3") is None
    assert await locks.release_all(B) == 0
    await locks.release_all(A)
    await locks.acquire(B, ["orders:1", "orders:2", "orders:3"])
    assert await locks.holder("orders:2") == B


async def test_locks_reacquire_by_holder(locks: RedisLocks) -> None:
    await locks.acquire(A, ["orders:1"])
    await locks.acquire(A, ["orders:1"])
    await locks.acquire(A, ["orders:1", "stock:7"])
    assert await locks.holder("stock:7") == A
    assert await locks.release_all(A) == 2


async def test_locks_are_shared_by_replicas(redis_url: str) -> None:  # noqa: F811
    one, two = RedisLocks.from_url(redis_url), RedisLocks.from_url(redis_url)
    try:
        await one.acquire(A, ["orders:1"])
        with pytest.raises(LockConflict):
            await two.acquire(B, ["orders:1"])
        assert await two.release_all(A) == 1  # the transaction ended; any replica may free
        await two.acquire(B, ["orders:1"])
        assert await one.holder("orders:1") == B
    finally:
        await one.close()
        await two.close()


async def test_locks_race_for_one_hot_key(redis_url: str) -> None:  # noqa: F811
    replicas = [RedisLocks.from_url(redis_url) for _ in range(4)]
    xids = [f"10.0.0.1:8091:{i}" for i in range(1, 101)]
    try:
        results = await asyncio.gather(
            *(
                replicas[i % 4].acquire(x, [f"own:{i}", "orders:hot", f"other:{i}"])
                for i, x in enumerate(xids)
            ),
            return_exceptions=True,
        )
        winners = [x for x, r in zip(xids, results, strict=True) if r is None]
        assert len(winners) == 1, results
        assert await replicas[0].holder("orders:hot") == winners[0]
        for i, (x, r) in enumerate(zip(xids, results, strict=True)):
            if x == winners[0]:
                assert await replicas[1].holder(f"own:{i}") == x
                continue
            assert isinstance(r, LockConflict), r
            assert (r.key, r.holder) == ("orders:hot", winners[0])
            # no partial holds: the loser's own keys, before and after the hot one, are free
            assert await replicas[1].holder(f"own:{i}") is None
            assert await replicas[1].holder(f"other:{i}") is None
    finally:
        for r in replicas:
            await r.close()


async def test_locks_race_for_overlapping_sets(redis_url: str) -> None:  # noqa: F811
    rng = random.Random(7)
    replicas = [RedisLocks.from_url(redis_url) for _ in range(4)]
    pool = [f"orders:{n}" for n in range(12)]
    wants = {f"10.0.0.1:8091:{i}": rng.sample(pool, 3) for i in range(1, 81)}
    try:
        results = dict(
            zip(
                wants,
                await asyncio.gather(
                    *(replicas[i % 4].acquire(x, k) for i, (x, k) in enumerate(wants.items())),
                    return_exceptions=True,
                ),
                strict=True,
            )
        )
        winners = {x for x, r in results.items() if r is None}
        assert winners
        # winners' sets are disjoint: each key was won at most once
        won = [k for x in winners for k in wants[x]]
        assert len(won) == len(set(won))
        holders = {k: await replicas[0].holder(k) for k in pool}
        for key, holder in holders.items():
            if holder is None:
                assert key not in won
            else:
                assert holder in winners and key in wants[holder]
        for x, r in results.items():
            if x in winners:
                assert all(holders[k] == x for k in wants[x])
            else:
                assert isinstance(r, LockConflict), r
                assert r.key in wants[x] and r.holder in winners and r.key in wants[r.holder]
                assert await replicas[2].release_all(x) == 0  # a loser holds nothing
    finally:
        for r in replicas:
            await r.close()


async def test_locks_ttl_safety_net(locks: RedisLocks) -> None:
    await locks.acquire(A, ["orders:1"], ttl=1.0)
    await locks.acquire(A, ["orders:2"])  # inherits the XID's TTL
    await locks.acquire(B, ["orders:3"])  # no TTL: held until released
    assert await locks.holder("orders:1") == A
    await _wait_until_gone(lambda: locks.holder("orders:1"))
    await _wait_until_gone(lambda: locks.holder("orders:2"))
    assert await locks.holder("orders:3") == B
    await locks.acquire(C, ["orders:1"])
    assert await locks.release_all(A) == 0  # an expired XID frees nothing it lost


async def test_locks_release_leaves_a_key_taken_over_after_expiry(locks: RedisLocks) -> None:
    await locks.acquire(A, ["orders:1", "orders:2"], ttl=1.0)
    await _wait_until_gone(lambda: locks.holder("orders:1"))
    await locks.acquire(B, ["orders:1"])
    assert await locks.release_all(A) == 0
    assert await locks.holder("orders:1") == B


async def test_locks_default_ttl(redis_url: str) -> None:  # noqa: F811
    manager = RedisLocks.from_url(redis_url, default_ttl=1.0)
    try:
        await manager.acquire(A, ["orders:1"])
        await _wait_until_gone(lambda: manager.holder("orders:1"))
    finally:
        await manager.close()


# --- errors --------------------------------------------------------------------------------


async def test_unreachable_redis_is_store_unavailable() -> None:
    # a port that was free a moment ago: nobody listens there
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    idem = IdempotencyStore.from_url(dead, timeout=0.5)
    nonces = RedisNonceStore.from_url(dead, timeout=0.5)
    manager = RedisLocks.from_url(dead, timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable, match="idempotency store redis://127.0.0.1"):
            await idem.put_if_absent("k", b"v")
        with pytest.raises(StoreUnavailable, match="idempotency store"):
            await idem.get("k")
        with pytest.raises(StoreUnavailable, match="nonce store"):
            await nonces.seen("k", "00", 10)
        with pytest.raises(StoreUnavailable, match="lock store") as info:
            await manager.acquire(A, ["orders:1"])
        assert info.value.status == 503 and info.value.code == "STORE_UNAVAILABLE"
        with pytest.raises(StoreUnavailable):
            await manager.release_all(A)
        with pytest.raises(StoreUnavailable):
            await manager.holder("orders:1")
    finally:
        await idem.close()
        await nonces.close()
        await manager.close()
