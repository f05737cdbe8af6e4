"""The idempotency store in memory, Redis URL parsing, and the config sections."""

from __future__ import annotations

import asyncio

import pytest

from sidecar import config as configmod
from sidecar.coordinator.nonces import MemoryNonceStore
from sidecar.errors import BadRequest, ConfigError
from sidecar.idempotency import IdempotencyStore, RedisAddress


async def test_memory_put_if_absent_and_get() -> None:
    store = IdempotencyStore.from_url("memory", ttl=60)
    try:
        assert not store.shared
        assert await store.get("k1") is None
        assert await store.put_if_absent("k1", b'{"xid": "a"}') is True
        assert await store.put_if_absent("k1", b'{"xid": "b"}') is False
        assert await store.get("k1") == b'{"xid": "a"}'
        assert await store.get("k2") is None
    finally:
        await store.close()


async def test_memory_stores_are_separate() -> None:
    one, two = IdempotencyStore.memory(), IdempotencyStore.memory()
    try:
        assert await one.put_if_absent("k", b"1")
        assert await two.put_if_absent("k", b"2")
    finally:
        await one.close()
        await two.close()


async def test_memory_put_if_absent_is_atomic() -> None:
    store = IdempotencyStore.memory()
    try:
        results = await asyncio.gather(
            *(store.put_if_absent("same", str(i).encode()) for i in range(100))
        )
        assert results.count(True) == 1
        winner = results.index(True)
        assert await store.get("same") == str(winner).encode()
    finally:
        await store.close()


async def test_memory_ttl_expires() -> None:
    store = IdempotencyStore.memory()
    try:
        assert await store.put_if_absent("k", b"v", ttl=0.05)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0  # 20x the TTL
        while await store.get("k") is not None:
            assert loop.time() < deadline, "key outlived its TTL"
            await asyncio.sleep(0.01)
        assert await store.put_if_absent("k", b"w")
    finally:
        await store.close()


async def test_memory_nonce_store_is_in_process() -> None:
    store = IdempotencyStore.memory()
    try:
        assert isinstance(store.nonce_store(), MemoryNonceStore)
    finally:
        await store.close()


async def test_bad_arguments() -> None:
    store = IdempotencyStore.memory()
    try:
        with pytest.raises(BadRequest):
            await store.get("")
        with pytest.raises(BadRequest):
            await store.put_if_absent("k" * 513, b"v")
        with pytest.raises(TypeError):
            await store.put_if_absent("k", "not bytes")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="positive"):
            await store.put_if_absent("k", b"v", ttl=0)
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://cache", RedisAddress("cache", 6379, 0, False)),
        ("redis://10.0.0.5:6380/3", RedisAddress("10.0.0.5", 6380, 3, False)),
        ("rediss://cache:6390/", RedisAddress("cache", 6390, 0, True)),
        ("redis://[::1]:7000/1", RedisAddress("::1", 7000, 1, False)),
    ],
)
def test_redis_address(url: str, expected: RedisAddress) -> None:
    assert RedisAddress.parse(url) == expected


def test_redis_address_renders_without_secrets() -> None:
    assert str(RedisAddress.parse("redis://[::1]:7000/1")) == "redis://[::1]:7000/1"


@pytest.mark.parametrize(
    "url", ["http://cache", "redis://", "redis://u:p@cache", "redis://cache:x", "redis://c/db"]
)
def test_redis_address_refused(url: str) -> None:
    with pytest.raises(ValueError):
        RedisAddress.parse(url)


def test_config_defaults() -> None:
    cfg = configmod.parse({}, env={})
    assert cfg.idempotency.store == "memory"
    assert cfg.idempotency.ttl == 86400.0
    assert cfg.locks.backend == "journal"


def test_config_redis() -> None:
    cfg = configmod.parse(
        {
            "idempotency": {"store": "redis://cache:6379/2", "ttl": "1h"},
            "locks": {"backend": "rediss://locks"},
        },
        env={},
    )
    assert cfg.idempotency.store == "redis://cache:6379/2"
    assert cfg.idempotency.ttl == 3600.0
    assert cfg.locks.backend == "rediss://locks"


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ({"idempotency": {"store": "memcached://x"}}, "idempotency.store", "memory, or redis"),
        ({"idempotency": {"store": "redis://u:pw@x"}}, "idempotency.store", "password_file"),
        ({"idempotency": {"store": "redis://x/a"}}, "idempotency.store", "invalid db"),
        ({"idempotency": {"store": "redis://x?db=1"}}, "idempotency.store", "query"),
        ({"idempotency": {"ttl": "0s"}}, "idempotency.ttl", "greater than zero"),
        ({"locks": {"backend": "sqlite"}}, "locks.backend", "memory, or redis"),
        ({"locks": {"backend": "redis://x:99999"}}, "locks.backend", "invalid port"),
    ],
)
def test_config_refused(section: dict[str, object], value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        configmod.parse(section, env={})
    assert any(p.startswith(value + ":") and message in p for p in info.value.problems), (
        info.value.problems
    )
    assert "pw" not in str(info.value)
