"""The idempotency store (an `Idempotency-Key` → the first answer) and the shared replay cache
of signed requests: in this process, or in a Redis shared by a service's replicas
(docs/signing.md; README, Configuration).

Both are "first writer wins": `put_if_absent` and `RedisNonceStore.seen` check and record in one
atomic step (Redis `SET NX PX`; in memory, no await between the check and the write), so two
requests racing with one key, on one replica or on two, cannot both believe they came first.
Redis and aiocache failures are translated here, once, into `StoreUnavailable`; the
`sidecar.txn.locks` adapter reuses `redis_client` and `store_errors` for the same reason.

redis-py and aiocache (which imports redis-py, and redis-py OpenTelemetry) are imported only
when a Redis URL is configured: they cost a sidecar ~9 MB of RSS it does not need with the
in-memory store, which is a small dict of its own here.
"""

from __future__ import annotations

import contextlib
import heapq
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from sidecar.coordinator.nonces import MemoryNonceStore, NonceStore
from sidecar.errors import BadRequest, SidecarError, StoreUnavailable

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry

#: how long a key is remembered when the caller names no TTL (config: idempotency.ttl)
DEFAULT_TTL: Final = 86400.0
#: one Redis round trip, connect included; stays well below any transaction timeout
DEFAULT_TIMEOUT: Final = 2.0
MAX_KEY_LENGTH: Final = 512


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where a Redis server is: parsed from `redis://host[:port][/db]` (`rediss://`: TLS).

    No password here: it comes from a secret file, so the URL can be logged."""

    host: str
    port: int = 6379
    db: int = 0
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(f"not a Redis URL: {url!r} (redis://host[:port][/db])")
        if parts.username is not None or parts.password is not None:
            raise ValueError("a Redis password goes in password_file, not in the URL")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"invalid port in {url!r}") from None
        db_s = parts.path.lstrip("/")
        if db_s and not (db_s.isascii() and db_s.isdigit()):
            raise ValueError(f"invalid db in {url!r} (a number: redis://host:6379/0)")
        return cls(parts.hostname, port, int(db_s or 0), parts.scheme == "rediss")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"


def _retry() -> Retry:
    # One immediate retry covers a pooled connection that Redis closed (a restart, an idle
    # timeout); more, with backoff, would let one call outlive the transaction it serves.
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Retry(NoBackoff(), 1)


def redis_client(
    url: str, *, password: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> aioredis.Redis:
    """A Redis client (its own connection pool) for `url`; close it with `aclose()`."""
    import redis.asyncio as aioredis

    addr = RedisAddress.parse(url)
    return aioredis.Redis(
        host=addr.host,
        port=addr.port,
        db=addr.db,
        password=password,
        ssl=addr.tls,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=_retry(),
    )


@contextlib.contextmanager
def store_errors(where: str) -> Iterator[None]:
    """Translate what Redis, aiocache and sockets raise into StoreUnavailable, naming `where`
    (a URL without secrets). Our own errors pass through untouched."""
    try:
        yield
    except SidecarError:
        raise
    except TimeoutError:  # aiocache's per-call timeout (asyncio.wait_for)
        raise StoreUnavailable(f"{where}: no answer in time") from None
    except OSError as exc:
        raise StoreUnavailable(f"{where}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:
        if not _is_redis_error(exc):
            raise
        raise StoreUnavailable(f"{where}: {type(exc).__name__}: {exc}") from None


def _is_redis_error(exc: Exception) -> bool:
    # redis-py is imported only with a Redis store: when it is not loaded, nothing raised
    # can be one of its errors
    module = sys.modules.get("redis.exceptions")
    return module is not None and isinstance(exc, module.RedisError)


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise BadRequest(
            f"an idempotency key must be a non-empty string of at most {MAX_KEY_LENGTH} characters"
        )


def _ttl_ms(ttl: float) -> int:
    if not ttl > 0:
        raise ValueError(f"TTL must be positive, not {ttl!r}")
    return max(1, round(ttl * 1000))


class MemoryCache:
    """The in-process store behind `IdempotencyStore.memory`: the part of aiocache's API the
    store uses (`get`, `add`, `set`, `delete`, `clear`), without aiocache.

    A key expires `ttl` seconds after it was written. Expired keys are dropped when read and,
    through a heap of expiry times, on every write, so the dict holds no more than the live
    keys plus those that expired since the last write; no timer per key. Every method runs
    without an await, so `add`'s check and write are one atomic step on the event loop."""

    __slots__ = ("_clock", "_items", "_expiry")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: key -> (value, expires at on `clock`)
        self._items: dict[str, tuple[bytes, float]] = {}
        #: (expires at, key); stale entries (a key rewritten or deleted since) are skipped
        self._expiry: list[tuple[float, str]] = []

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._items[key]
            return None
        return item[0]

    async def add(self, key: str, value: bytes, ttl: float) -> None:
        """Raises ValueError when the key is there (aiocache's behaviour, which the store
        relies on)."""
        now = self._clock()
        item = self._items.get(key)
        if item is not None and item[1] > now:
            raise ValueError(f"key {key!r} already exists")
        self._write(key, value, now + ttl, now)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        now = self._clock()
        self._write(key, value, now + ttl, now)

    async def delete(self, key: str) -> None:
        self._items.pop(key, None)

    async def clear(self, namespace: str | None = None) -> None:
        self._items.clear()
        self._expiry.clear()

    def __len__(self) -> int:
        return len(self._items)

    def _write(self, key: str, value: bytes, expires: float, now: float) -> None:
        self._purge(now)
        self._items[key] = (value, expires)
        heapq.heappush(self._expiry, (expires, key))
        if len(self._expiry) > 2 * len(self._items) + 64:
            # rewritten and deleted keys left stale entries: rebuild from the live ones
            self._expiry = [(at, k) for k, (_, at) in self._items.items()]
            heapq.heapify(self._expiry)

    def _purge(self, now: float) -> None:
        expiry, items = self._expiry, self._items
        while expiry and expiry[0][0] <= now:
            at, key = heapq.heappop(expiry)
            item = items.get(key)
            if item is not None and item[1] == at:
                del items[key]


class IdempotencyStore:
    """Idempotency keys in `MemoryCache` (one process) or aiocache's `RedisCache`.

    Values are bytes, stored as they are (no serializer in between), so callers keep their
    own format (typically the JSON of the first answer)."""

    def __init__(
        self,
        cache: Any,
        *,
        namespace: str,
        ttl: float = DEFAULT_TTL,
        where: str = "memory",
        redis: aioredis.Redis | None = None,
    ) -> None:
        _ttl_ms(ttl)
        self._cache = cache
        self._namespace = namespace
        self.ttl = ttl
        #: for error messages and logs: "memory" or the Redis URL (never a password)
        self.where = where
        self._redis = redis
        self._closed = False

    @classmethod
    def memory(cls, *, ttl: float = DEFAULT_TTL, namespace: str = "gts:idem") -> IdempotencyStore:
        return cls(MemoryCache(), namespace=namespace, ttl=ttl)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ttl: float = DEFAULT_TTL,
        password: str | None = None,
        namespace: str = "gts:idem",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> IdempotencyStore:
        """`memory` or `redis://host[:port][/db]` (config: idempotency.store)."""
        if url == "memory":
            return cls.memory(ttl=ttl, namespace=namespace)
        addr = RedisAddress.parse(url)
        from aiocache import Cache
        from aiocache.serializers import NullSerializer

        cache = Cache(
            Cache.REDIS,
            endpoint=addr.host,
            port=addr.port,
            db=addr.db,
            password=password,
            ssl=addr.tls,
            namespace=namespace,
            # encoding=None: values come back as the bytes that were stored
            serializer=NullSerializer(encoding=None),
            timeout=timeout,
            create_connection_timeout=timeout,
            connection_pool_kwargs={"socket_timeout": timeout, "retry": _retry()},
        )
        return cls(cache, namespace=namespace, ttl=ttl, where=str(addr), redis=cache.client)

    @property
    def shared(self) -> bool:
        """True when replicas pointing at the same Redis see each other's keys."""
        return self._redis is not None

    async def get(self, key: str) -> bytes | None:
        _check_key(key)
        with store_errors(f"idempotency store {self.where}"):
            value = await self._cache.get(key)
        return value if isinstance(value, bytes) or value is None else bytes(value)

    async def put_if_absent(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        """Record `value` under `key` unless the key is already there: True if this call
        recorded it, False if an earlier one did (then `get` returns the earlier value)."""
        _check_key(key)
        if not isinstance(value, bytes):
            raise TypeError("idempotency values are bytes")
        seconds = self.ttl if ttl is None else ttl
        _ttl_ms(seconds)
        with store_errors(f"idempotency store {self.where}"):
            try:
                await self._cache.add(key, value, ttl=seconds)
            except ValueError:  # aiocache: "Key ... already exists" (Redis SET NX said no)
                return False
        return True

    async def put(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Record `value` under `key`, replacing what was there (a claim's later states)."""
        _check_key(key)
        seconds = self.ttl if ttl is None else ttl
        _ttl_ms(seconds)
        with store_errors(f"idempotency store {self.where}"):
            await self._cache.set(key, value, ttl=seconds)

    async def delete(self, key: str) -> None:
        _check_key(key)
        with store_errors(f"idempotency store {self.where}"):
            await self._cache.delete(key)

    def nonce_store(self, *, namespace: str = "gts:nonce") -> NonceStore:
        """The replay cache of signed requests that goes with this store: shared through the
        same Redis connections when this store is in Redis, else a fresh in-process one."""
        if self._redis is None:
            return MemoryNonceStore()
        return RedisNonceStore(self._redis, namespace=namespace, where=self.where)

    async def close(self) -> None:
        """Close the Redis connections (nonce stores made by `nonce_store` share them)."""
        if self._closed:
            return
        self._closed = True
        if self._redis is not None:
            # not `cache.close()`: aiocache 0.12 calls redis-py's deprecated `close()`
            await self._redis.aclose()
        else:
            await self._cache.clear(namespace=self._namespace)


class RedisNonceStore:
    """`sidecar.coordinator.nonces.NonceStore` in Redis: replicas sharing a signing key share
    replay protection, so a request is accepted once by the whole service (docs/signing.md)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        namespace: str = "gts:nonce",
        where: str = "redis",
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._namespace = namespace
        self.where = where
        self._owns_client = owns_client

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        password: str | None = None,
        namespace: str = "gts:nonce",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> RedisNonceStore:
        client = redis_client(url, password=password, timeout=timeout)
        where = str(RedisAddress.parse(url))
        return cls(client, namespace=namespace, where=where, owns_client=True)

    async def seen(self, key_id: str, nonce: str, ttl_seconds: float) -> bool:
        key = f"{self._namespace}:{key_id}:{nonce}"
        with store_errors(f"nonce store {self.where}"):
            created = await self._client.set(key, b"1", nx=True, px=_ttl_ms(ttl_seconds))
        return not created

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()
