"""Global locks: key validation and the in-process backend (MemoryLocks)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from sidecar.errors import InvalidRequest, LockConflict, StoreUnavailable, XidInvalid
from sidecar.txn.locks import MAX_KEYS, MemoryLocks, ReleaseOnFinish, check_key, check_keys

A = "10.0.0.1:8091:1"
B = "10.0.0.1:8091:2"
C = "[::1]:8091:3"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["orders:42", "stock.sku-1:a/b:c", "x:1", "inventory:ключ", "r:" + "k" * 500]
)
def test_valid_keys(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("", "1-512"),
        ("orders", "resource:key"),
        ("orders:", "resource:key"),
        (":42", "resource"),
        ("-orders:42", "resource"),
        ("or ders:42", "whitespace"),
        ("orders:4 2", "whitespace"),
        ("orders:42\n", "whitespace"),
        ("orders:\x0042", "control"),
        ("orders:\u200b", "control"),
        ("orders:*", "whole table"),
        ("orders:%", "whole table"),
        ("r:" + "k" * 511, "1-512"),
        ("r" * 129 + ":1", "resource"),
    ],
)
def test_invalid_keys(key: str, why: str) -> None:
    with pytest.raises(InvalidRequest, match=why):
        check_key(key)


def test_key_lists() -> None:
    assert check_keys(["a:1", "b:2", "a:1"]) == ["a:1", "b:2"]
    with pytest.raises(InvalidRequest, match="at least one"):
        check_keys([])
    with pytest.raises(InvalidRequest, match="list"):
        check_keys("a:1")
    with pytest.raises(InvalidRequest, match="string"):
        check_keys(["a:1", 2])
    with pytest.raises(InvalidRequest, match=f"at most {MAX_KEYS}"):
        check_keys([f"a:{i}" for i in range(MAX_KEYS + 1)])


# --- MemoryLocks ---------------------------------------------------------------------------


async def test_acquire_and_holder() -> None:
    locks = MemoryLocks()
    assert await locks.holder("orders:1") is None
    await locks.acquire(A, ["orders:1", "orders:2"])
    assert await locks.holder("orders:1") == A
    assert await locks.holder("orders:2") == A
    assert await locks.holder("orders:3") is None


async def test_all_or_nothing_and_conflict_names_holder() -> None:
    locks = MemoryLocks()
    await locks.acquire(A, ["orders:2"])
    with pytest.raises(LockConflict) as info:
        await locks.acquire(B, ["orders:1", "orders:2", "orders:3"])
    err = info.value
    assert (err.key, err.holder, err.status, err.code) == ("orders:2", A, 409, "LOCK_CONFLICT")
    assert A in err.message and "orders:2" in err.message
    body = orjson.loads(err.body())
    assert body == {
        "error": {"code": "LOCK_CONFLICT", "message": err.message, "holder": A, "key": "orders:2"}
    }
    # nothing of B's request was taken
    assert await locks.holder("orders:1") is None
    assert await locks.holder("orders:3") is None
    assert await locks.release_all(B) == 0


async def test_reacquire_by_holder_is_idempotent() -> None:
    locks = MemoryLocks()
    await locks.acquire(A, ["orders:1"])
    await locks.acquire(A, ["orders:1"])
    await locks.acquire(A, ["orders:1", "orders:2"])
    assert await locks.release_all(A) == 2
    assert await locks.holder("orders:1") is None


async def test_release_all_frees_for_others() -> None:
    locks = MemoryLocks()
    await locks.acquire(A, ["orders:1", "stock:9"])
    await locks.acquire(C, ["orders:2"])
    assert await locks.release_all(A) == 2
    assert await locks.release_all(A) == 0
    await locks.acquire(B, ["orders:1", "stock:9"])
    assert await locks.holder("orders:1") == B
    assert await locks.holder("orders:2") == C


async def test_validation_of_xid_and_keys() -> None:
    locks = MemoryLocks()
    with pytest.raises(XidInvalid):
        await locks.acquire("10.0.0.1:8091:", ["orders:1"])
    with pytest.raises(XidInvalid):
        await locks.release_all("not an xid")
    with pytest.raises(InvalidRequest):
        await locks.acquire(A, ["orders"])
    with pytest.raises(InvalidRequest):
        await locks.holder("orders:*")
    with pytest.raises(InvalidRequest, match="positive"):
        await locks.acquire(A, ["orders:1"], ttl=0)


async def test_ttl_is_a_safety_net() -> None:
    clock = Clock()
    locks = MemoryLocks(clock=clock)
    await locks.acquire(A, ["orders:1"], ttl=10)
    await locks.acquire(A, ["orders:2"])  # no TTL: keeps the XID's deadline
    await locks.acquire(B, ["orders:3"])  # no TTL at all: held until released
    clock.now += 9.9
    assert await locks.holder("orders:1") == A
    clock.now += 0.1
    assert await locks.holder("orders:1") is None
    assert await locks.holder("orders:2") is None
    assert await locks.holder("orders:3") == B
    await locks.acquire(C, ["orders:1"])
    assert await locks.release_all(A) == 0


async def test_ttl_refresh_moves_the_deadline() -> None:
    clock = Clock()
    locks = MemoryLocks(clock=clock, default_ttl=5)
    await locks.acquire(A, ["orders:1"])
    clock.now += 4
    await locks.acquire(A, ["orders:2"], ttl=10)  # every key of A now lasts until +14
    clock.now += 6
    assert await locks.holder("orders:1") == A
    clock.now += 4
    assert await locks.holder("orders:1") is None
    assert await locks.holder("orders:2") is None


async def test_concurrent_acquirers_one_winner() -> None:
    locks = MemoryLocks()
    xids = [f"10.0.0.1:8091:{i}" for i in range(1, 51)]
    results = await asyncio.gather(
        *(locks.acquire(x, ["orders:hot", f"own:{x}"]) for x in xids), return_exceptions=True
    )
    winners = [x for x, r in zip(xids, results, strict=True) if r is None]
    assert len(winners) == 1
    for x, r in zip(xids, results, strict=True):
        if x not in winners:
            assert isinstance(r, LockConflict) and r.holder == winners[0]
            assert await locks.holder(f"own:{x}") is None


# --- ReleaseOnFinish -----------------------------------------------------------------------


class FlakyLocks(MemoryLocks):
    """Refuses the first `failures` releases as an unreachable store would."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.calls: list[str] = []

    async def release_all(self, xid: str) -> int:
        self.calls.append(xid)
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("lock store redis://x:6379/0: ConnectionError")
        return await super().release_all(xid)


async def test_release_on_finish() -> None:
    locks = MemoryLocks()
    await locks.acquire(A, ["orders:1", "orders:2"])
    await locks.acquire(B, ["orders:3"])
    releaser = ReleaseOnFinish(locks)
    releaser.finished(A)  # synchronous, as the engine's event is
    assert releaser.pending == 1
    await releaser.drain(5)
    assert releaser.pending == 0
    assert await locks.holder("orders:1") is None
    assert await locks.holder("orders:3") == B


async def test_release_on_finish_skips_transactions_that_took_no_lock() -> None:
    flaky = FlakyLocks(failures=0)
    await flaky.acquire(A, ["orders:1"])
    releaser = ReleaseOnFinish(flaky)
    releaser.finished(B)  # most transactions: nothing to release, no task, no store call
    assert releaser.pending == 0
    releaser.finished(A)
    await releaser.drain(5)
    assert flaky.calls == [A]


async def test_release_on_finish_retries_then_gives_up(caplog: pytest.LogCaptureFixture) -> None:
    flaky = FlakyLocks(failures=2)
    await flaky.acquire(A, ["orders:1"])
    releaser = ReleaseOnFinish(flaky, retries=3, delay=0.001)
    releaser.finished(A)
    await releaser.drain(5)
    assert flaky.calls == [A, A, A]
    assert await flaky.holder("orders:1") is None

    broken = FlakyLocks(failures=10)
    await broken.acquire(B, ["orders:2"])
    releaser = ReleaseOnFinish(broken, retries=2, delay=0.001)
    with caplog.at_level("WARNING", logger="sidecar.locks"):
        releaser.finished(B)
        await releaser.drain(5)
    assert broken.calls == [B, B, B]
    assert "not released" in caplog.text
    assert await broken.holder("orders:2") == B  # left to the TTL


async def test_release_on_finish_drain_is_bounded() -> None:
    gate = asyncio.Event()

    class Stuck(MemoryLocks):
        async def release_all(self, xid: str) -> int:
            await gate.wait()
            return 0

    stuck = Stuck()
    await stuck.acquire(A, ["orders:1"])
    releaser = ReleaseOnFinish(stuck)
    releaser.finished(A)
    assert releaser.pending == 1
    loop = asyncio.get_running_loop()
    start = loop.time()
    await releaser.drain(0.05)
    assert loop.time() - start < 1.0
    assert releaser.pending == 0
