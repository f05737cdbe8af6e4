"""Repeated requests on declared transaction routes: one `Idempotency-Key`, one run of the app.

A caller that got 503 with `x-gts-transaction-status: Unknown` (or no answer at all) and
retries must not place its order twice. So the first request carrying a key on a declared
transaction route claims it in the idempotency store (memory, or Redis shared by replicas:
"first writer wins"), and records its transaction's XID once begun and its outcome once
decided. A repeat never reaches the app; it is answered from that record:

- the first attempt is still running (no outcome yet): 409 `REQUEST_IN_PROGRESS` with
  `Retry-After`;
- its transaction is decided (Committed, Rollbacked, …): 409 `DUPLICATE_REQUEST` with `XID`
  and `x-gts-transaction-status`;
- its decision was not delivered (Unknown): the coordinator is asked; a decided outcome is
  answered as above, else 503 `COORDINATOR_UNAVAILABLE` with `Retry-After`;
- it began no transaction within its timeout (it died first): the repeat runs, taking the
  claim over.

A key reused for another method or target is 422 `IDEMPOTENCY_KEY_REUSED`. The app's body is
not replayed (the data plane streams it, it is never stored): the status headers say what
happened, and the caller reads the rest from its own service by the XID if it needs it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import orjson

from sidecar.errors import IdempotencyConflict, SidecarError
from sidecar.idempotency import IdempotencyStore

#: how long a repeat of a request still running is told to wait before asking again
RETRY_AFTER_SECONDS: Final = 1
RUNNING: Final = "running"
DECIDED: Final = "decided"


class RequestInProgress(SidecarError):
    """A repeat of a request whose first attempt has no outcome yet."""

    code = "REQUEST_IN_PROGRESS"
    status = 409


class DuplicateRequest(SidecarError):
    """A repeat of a request whose first attempt's transaction is decided: not run again."""

    code = "DUPLICATE_REQUEST"
    status = 409


@dataclass(frozen=True, slots=True)
class Attempt:
    """What the store holds for one (route, key): the first attempt as far as it got."""

    state: str
    fingerprint: str
    since_ms: int
    xid: str | None = None
    status: str | None = None

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "state": self.state,
                "fingerprint": self.fingerprint,
                "since_ms": self.since_ms,
                "xid": self.xid,
                "status": self.status,
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> Attempt:
        data = orjson.loads(raw)
        return cls(
            str(data["state"]),
            str(data["fingerprint"]),
            int(data["since_ms"]),
            data.get("xid"),
            data.get("status"),
        )


def fingerprint(method: bytes, target: bytes) -> str:
    """What must match for a repeat to be the same request (its body streams past us)."""
    return hashlib.sha256(method + b" " + target).hexdigest()[:32]


class Repeats:
    """The claim / begun / decided records of declared-route requests with a key."""

    def __init__(self, store: IdempotencyStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    @staticmethod
    def key(rule: str, idempotency_key: str) -> str:
        return f"txn-request:{rule}:{idempotency_key}"

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def claim(self, key: str, fp: str, timeout_ms: int) -> tuple[bool, Attempt]:
        """(True, this attempt) when this request is the first with `key` (now recorded as
        running); else (False, the earlier attempt). An earlier attempt that began no
        transaction within its timeout died before it could (a crash): this request takes
        its place."""
        mine = Attempt(RUNNING, fp, self._now_ms())
        if await self.store.put_if_absent(key, mine.encode()):
            return True, mine
        raw = await self.store.get(key)
        if raw is None:  # expired between the two calls
            return await self.claim(key, fp, timeout_ms)
        earlier = Attempt.decode(raw)
        if earlier.fingerprint != fp:
            raise IdempotencyConflict(
                "this Idempotency-Key was used for a different request (method or target)"
            )
        if earlier.state == RUNNING and earlier.xid is None:
            if mine.since_ms - earlier.since_ms > timeout_ms:
                await self.store.put(key, mine.encode())
                return True, mine
        return False, earlier

    async def release(self, key: str) -> None:
        """The first attempt began no transaction (it was refused): a retry may run."""
        await self.store.delete(key)

    async def begun(self, key: str, mine: Attempt, xid: str) -> Attempt:
        attempt = Attempt(RUNNING, mine.fingerprint, mine.since_ms, xid)
        await self.store.put(key, attempt.encode())
        return attempt

    async def decided(self, key: str, mine: Attempt, status: str) -> None:
        state = RUNNING if status == "Unknown" else DECIDED
        attempt = Attempt(state, mine.fingerprint, mine.since_ms, mine.xid, status)
        await self.store.put(key, attempt.encode())
