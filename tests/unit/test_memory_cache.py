"""The in-process idempotency store's cache (sidecar.idempotency.MemoryCache), on an injected
clock: first writer wins, keys expire, and expired keys do not pile up."""

from __future__ import annotations

import pytest

from sidecar.idempotency import IdempotencyStore, MemoryCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_add_refuses_a_live_key_and_takes_an_expired_one() -> None:
    clock = Clock()
    cache = MemoryCache(clock)
    await cache.add("k", b"first", ttl=10)
    with pytest.raises(ValueError):
        await cache.add("k", b"second", ttl=10)
    assert await cache.get("k") == b"first"
    clock.now += 10  # expires exactly at its TTL
    assert await cache.get("k") is None
    await cache.add("k", b"third", ttl=10)
    assert await cache.get("k") == b"third"


async def test_set_replaces_and_restarts_the_ttl() -> None:
    clock = Clock()
    cache = MemoryCache(clock)
    await cache.add("k", b"claim", ttl=5)
    clock.now += 4
    await cache.set("k", b"answer", ttl=5)
    clock.now += 4  # past the first TTL, within the second
    assert await cache.get("k") == b"answer"
    await cache.delete("k")
    assert await cache.get("k") is None
    await cache.delete("never-there")


async def test_expired_keys_are_dropped_on_write_without_being_read() -> None:
    clock = Clock()
    cache = MemoryCache(clock)
    for i in range(1000):
        await cache.add(f"old-{i}", b"v", ttl=1)
    clock.now += 2
    await cache.add("new", b"v", ttl=1)
    assert len(cache) == 1


async def test_rewritten_keys_leave_no_unbounded_expiry_entries() -> None:
    cache = MemoryCache(Clock())
    for _ in range(10_000):
        await cache.set("same", b"v", ttl=60)
    assert len(cache) == 1
    assert len(cache._expiry) <= 2 * len(cache) + 64 + 1


async def test_a_rewritten_key_is_not_dropped_at_its_old_expiry() -> None:
    clock = Clock()
    cache = MemoryCache(clock)
    await cache.set("k", b"short", ttl=1)
    await cache.set("k", b"long", ttl=100)
    clock.now += 2
    await cache.set("other", b"v", ttl=1)  # purges what expired: not "k"
    assert await cache.get("k") == b"long"


async def test_clear() -> None:
    cache = MemoryCache(Clock())
    await cache.set("a", b"1", ttl=10)
    await cache.clear(namespace="gts:idem")
    assert await cache.get("a") is None
    assert len(cache) == 0


async def test_store_memory_uses_it() -> None:
    store = IdempotencyStore.memory(ttl=60)
    try:
        assert isinstance(store._cache, MemoryCache)
        assert await store.put_if_absent("k", b"1")
        assert not await store.put_if_absent("k", b"2")
        await store.put("k", b"3")
        assert await store.get("k") == b"3"
    finally:
        await store.close()
