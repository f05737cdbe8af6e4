"""Global locks held by XIDs (seed §3.3): a global transaction locks the resource keys it
changes, all or nothing, until it ends; anyone else asking for one of them is refused with
LOCK_CONFLICT, which names the holder's XID and the key.

Rules:
- A lock key is `resource:key`, one row or entity: never a whole table. The resource names
  the data set (the tcc/saga resource names fit), the key one item in it.
- `acquire` is all or nothing: every key is free or already held by the same XID, or nothing
  changes. Acquiring keys the XID already holds is a no-op (retries are safe).
- `release_all(xid)` frees every key of the XID; the sidecar calls it when the global
  transaction reaches a final state (any outcome, timeouts included).
- A TTL (the transaction's timeout) is a safety net for a release that never comes (a crashed
  sidecar, a transaction whose end this process never sees), never the normal way out. An
  acquire with a TTL sets it for every key of the XID; one without keeps the XID's current one.

Backends: `MemoryLocks` (one process, lost on restart) and `RedisLocks` (shared by replicas;
each operation is one Lua script, so it is atomic on the server). `ReleaseOnFinish` connects
`release_all` to the engine's `finished` event.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, Protocol

from sidecar.errors import InvalidRequest, LockConflict, SidecarError, XidInvalid
from sidecar.idempotency import DEFAULT_TIMEOUT, RedisAddress, redis_client, store_errors
from sidecar.xid import parse as parse_xid

if TYPE_CHECKING:  # imported by redis_client, with a Redis backend only
    import redis.asyncio as aioredis

log = logging.getLogger("sidecar.locks")

#: the longest lock key, in characters
MAX_KEY_LENGTH: Final = 512
#: the most keys one acquire may name
MAX_KEYS: Final = 1000
#: XIDs are validated by format here; their length limit is the listener's (xid.max_length)
_XID_MAX: Final = 4096
#: as the tcc/saga resource names of the config
_RESOURCE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_key(key: object) -> str:
    """One lock key, validated: `resource:key` (see the module rules) or InvalidRequest."""
    if not isinstance(key, str):
        raise InvalidRequest(f"a lock key must be a string, not {type(key).__name__}")
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidRequest(f"a lock key must be 1-{MAX_KEY_LENGTH} characters long")
    if not key.isprintable() or " " in key:
        raise InvalidRequest(f"lock key {key[:64]!r} contains whitespace or control characters")
    resource, sep, item = key.partition(":")
    if not sep or not item:
        raise InvalidRequest(
            f"lock key {key[:64]!r} must be resource:key (one item, e.g. orders:42)"
        )
    if not _RESOURCE_RE.fullmatch(resource):
        raise InvalidRequest(
            f"lock key {key[:64]!r}: the resource must be 1-128 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    if item.strip("*%") == "":
        raise InvalidRequest(
            f"lock key {key[:64]!r} looks like a wildcard: locks are per resource key, "
            "never a whole table"
        )
    return key


def check_keys(keys: object) -> list[str]:
    """A list of lock keys, validated, duplicates dropped (first occurrence kept)."""
    if not isinstance(keys, list | tuple):
        raise InvalidRequest('keys must be a list of "resource:key" strings')
    if not keys:
        raise InvalidRequest("keys must name at least one lock")
    if len(keys) > MAX_KEYS:
        raise InvalidRequest(f"at most {MAX_KEYS} keys per request, not {len(keys)}")
    return list(dict.fromkeys(check_key(k) for k in keys))


def _check_xid(xid: str) -> str:
    return parse_xid(xid, max_length=_XID_MAX).raw


def _check_ttl(ttl: float | None) -> float | None:
    if ttl is not None and not ttl > 0:
        raise InvalidRequest(f"a lock TTL must be positive, not {ttl!r}")
    return ttl


class LockManager(Protocol):
    async def acquire(self, xid: str, keys: Sequence[str], *, ttl: float | None = None) -> None:
        """Hold every key for `xid`, or raise LockConflict (naming a holder and its key) and
        change nothing. Keys the XID holds already stay held."""
        ...

    async def release_all(self, xid: str) -> int:
        """Free every key `xid` holds; returns how many."""
        ...

    async def holder(self, key: str) -> str | None:
        """The XID holding `key`, or None."""
        ...

    def may_hold(self, xid: str) -> bool:
        """False only when `xid` surely holds no lock here (so its release can be skipped:
        most transactions never take one)."""
        ...

    async def close(self) -> None: ...


class MemoryLocks:
    """In-process locks: one sidecar only, lost on restart. No await inside an operation, so
    each one is atomic on the event loop."""

    def __init__(
        self,
        *,
        default_ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default_ttl = _check_ttl(default_ttl)
        self._clock = clock
        self._holders: dict[str, str] = {}
        self._held: dict[str, set[str]] = {}
        self._deadline: dict[str, float] = {}
        # (deadline, xid), lazily pruned: an entry whose deadline was moved is skipped
        self._expiry: list[tuple[float, str]] = []

    async def acquire(self, xid: str, keys: Sequence[str], *, ttl: float | None = None) -> None:
        xid = _check_xid(xid)
        wanted = check_keys(keys)
        ttl = _check_ttl(ttl) or self.default_ttl
        now = self._clock()
        self._expire(now)
        for key in wanted:
            holder = self._holders.get(key)
            if holder is not None and holder != xid:
                raise LockConflict(key, holder)
        held = self._held.setdefault(xid, set())
        for key in wanted:
            self._holders[key] = xid
            held.add(key)
        if ttl is not None:
            deadline = now + ttl
            self._deadline[xid] = deadline
            heapq.heappush(self._expiry, (deadline, xid))

    async def release_all(self, xid: str) -> int:
        xid = _check_xid(xid)
        self._expire(self._clock())
        return self._release(xid)

    async def holder(self, key: str) -> str | None:
        key = check_key(key)
        self._expire(self._clock())
        return self._holders.get(key)

    def may_hold(self, xid: str) -> bool:
        return xid in self._held

    async def close(self) -> None:
        pass

    def _release(self, xid: str) -> int:
        self._deadline.pop(xid, None)
        released = 0
        for key in self._held.pop(xid, ()):
            if self._holders.get(key) == xid:
                del self._holders[key]
                released += 1
        return released

    def _expire(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            deadline, xid = heapq.heappop(expiry)
            if self._deadline.get(xid) == deadline:
                self._release(xid)


# KEYS[1]: the set of the XID's lock keys; KEYS[2..]: the lock keys wanted.
# ARGV[1]: the XID; ARGV[2]: TTL in ms, or 0 to keep the XID's current TTL (none, if it has none).
# Returns 0, or {position of the first conflicting key (1-based), its holder}.
_ACQUIRE: Final = """
local xid = ARGV[1]
for i = 2, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder and holder ~= xid then
    return {i - 1, holder}
  end
end
local ttl = tonumber(ARGV[2])
local refresh = ttl > 0
if not refresh then
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then ttl = left end
end
for i = 2, #KEYS do
  if ttl > 0 then
    redis.call('SET', KEYS[i], xid, 'PX', ttl)
  else
    redis.call('SET', KEYS[i], xid)
  end
  redis.call('SADD', KEYS[1], KEYS[i])
end
if refresh then
  for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    if redis.call('GET', key) == xid then
      redis.call('PEXPIRE', key, ttl)
    end
  end
end
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 0
"""

# KEYS[1]: the set of the XID's lock keys; ARGV[1]: the XID. Returns how many were freed.
# A key no longer held by the XID (expired, then taken by another) is left alone.
_RELEASE: Final = """
local n = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    n = n + 1
  end
end
redis.call('DEL', KEYS[1])
return n
"""


class RedisLocks:
    """Locks in one Redis (a standalone server or a Sentinel-managed primary, not Redis
    Cluster: the scripts touch keys of several slots). As durable as that Redis: with
    asynchronous replication, a failover can lose locks taken just before it."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        namespace: str = "gts:lock",
        default_ttl: float | None = None,
        where: str = "redis",
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._namespace = namespace
        self.default_ttl = _check_ttl(default_ttl)
        self.where = where
        self._owns_client = owns_client
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        password: str | None = None,
        namespace: str = "gts:lock",
        default_ttl: float | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> RedisLocks:
        """Config: locks.backend (a redis:// URL) and locks.password_file."""
        client = redis_client(url, password=password, timeout=timeout)
        where = str(RedisAddress.parse(url))
        return cls(
            client, namespace=namespace, default_ttl=default_ttl, where=where, owns_client=True
        )

    def _key(self, key: str) -> str:
        return f"{self._namespace}:k:{key}"

    def _set(self, xid: str) -> str:
        return f"{self._namespace}:x:{xid}"

    async def acquire(self, xid: str, keys: Sequence[str], *, ttl: float | None = None) -> None:
        xid = _check_xid(xid)
        wanted = check_keys(keys)
        ttl = _check_ttl(ttl) or self.default_ttl
        ttl_ms = 0 if ttl is None else max(1, round(ttl * 1000))
        with store_errors(f"lock store {self.where}"):
            result = await self._acquire(
                keys=[self._set(xid), *(self._key(k) for k in wanted)], args=[xid, ttl_ms]
            )
        if result != 0:
            position, holder = result
            raise LockConflict(wanted[int(position) - 1], _text(holder))

    def may_hold(self, xid: str) -> bool:
        return True  # shared: another sidecar may have taken locks for it

    async def release_all(self, xid: str) -> int:
        xid = _check_xid(xid)
        with store_errors(f"lock store {self.where}"):
            released = await self._release(keys=[self._set(xid)], args=[xid])
        return int(released)

    async def holder(self, key: str) -> str | None:
        key = check_key(key)
        with store_errors(f"lock store {self.where}"):
            value = await self._client.get(self._key(key))
        return None if value is None else _text(value)

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ReleaseOnFinish:
    """Frees a global transaction's locks once it reaches a final state.

    `finished(xid)` is synchronous, for the engine's `finished` event: it starts the release
    as a named task and keeps a reference. A release the store refuses is retried with
    backoff, then logged and left to the TTL safety net. `drain` waits a bounded time for
    releases in flight at shutdown, then cancels the rest."""

    def __init__(self, locks: LockManager, *, retries: int = 3, delay: float = 0.5) -> None:
        self.locks = locks
        self.retries = retries
        self.delay = delay
        self._tasks: set[asyncio.Task[None]] = set()

    def finished(self, xid: str) -> None:
        if not self.locks.may_hold(xid):
            return
        task = asyncio.get_running_loop().create_task(
            self._release(xid), name=f"release-locks {xid}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, xid: str) -> None:
        for attempt in range(self.retries + 1):
            try:
                released = await self.locks.release_all(xid)
            except SidecarError as exc:
                if attempt < self.retries and not isinstance(exc, XidInvalid):
                    await asyncio.sleep(self.delay * 2**attempt)
                    continue
                log.warning(
                    "global locks not released; the TTL, if any, will free them",
                    extra={"xid": xid, "error": exc.message},
                )
                return
            if released:
                log.debug("global locks released", extra={"xid": xid, "count": released})
            return

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
