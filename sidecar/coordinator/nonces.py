"""The replay cache of signed requests (docs/signing.md): a nonce is accepted once per key id.

The receiver calls `check_replay` after `signing.verify` succeeded and before it parses the
body. `MemoryNonceStore` serves one process; replicas that share a signing key need a shared
store (Redis, later) behind the same small protocol.

Why the TTL is twice the window: a timestamp `ts` verifies while the receiver's clock is in
[ts - window, ts + window], so the same request can first arrive at ts - window and be
replayed up to ts + window: 2 × window after it was first seen.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Protocol

from sidecar.coordinator.signing import Verified
from sidecar.errors import SignatureInvalid

DEFAULT_MAX_ENTRIES: Final = 1_000_000


def nonce_ttl(window_s: float) -> float:
    """How long a nonce must be remembered for a signature window of `window_s` seconds."""
    return 2.0 * window_s


class NonceStore(Protocol):
    async def seen(self, key_id: str, nonce: str, ttl_seconds: float) -> bool:
        """True if (key_id, nonce) was recorded within its TTL; otherwise record it (check and
        record are one atomic step, so two concurrent requests cannot both pass) → False."""
        ...


async def check_replay(store: NonceStore, verified: Verified, *, window_s: float) -> None:
    """Refuse a nonce seen before: SignatureInvalid(reason="replay")."""
    if await store.seen(verified.key_id, verified.nonce, nonce_ttl(window_s)):
        raise SignatureInvalid(
            "nonce already used (a replayed or re-sent request; sign every attempt anew)",
            reason="replay",
        )


class MemoryNonceStore:
    """In-process store: nonces expire after their TTL, and at most `max_entries` are kept.

    When full, the oldest entry is evicted. Eviction can only shorten the replay protection
    of that one nonce, never refuse a fresh request; and since `verify` refuses any timestamp
    older than the window, an evicted nonce whose request is older than `window` is still
    refused (as stale). Size it above peak signed requests/s × 2 × window so that nothing
    younger is ever evicted; `evictions` counts the times that did not hold.
    """

    __slots__ = ("_clock", "_max", "_expiry", "evictions")

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self._max = max_entries
        # insertion order = age order, so the oldest entry is first: purge and evict from there
        self._expiry: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._expiry)

    async def seen(self, key_id: str, nonce: str, ttl_seconds: float) -> bool:
        # No await in here: on one event loop the check and the record are atomic.
        now = self._clock()
        self._purge(now)
        key = (key_id, nonce)
        expires = self._expiry.get(key)
        if expires is not None and expires > now:
            return True
        if expires is not None:  # expired but not purged yet (TTLs differed): record anew
            del self._expiry[key]
        while len(self._expiry) >= self._max:
            self._expiry.popitem(last=False)
            self.evictions += 1
        self._expiry[key] = now + ttl_seconds
        return False

    def _purge(self, now: float) -> None:
        # Entries are in insertion order; with one TTL that is also expiry order. With mixed
        # TTLs this stops at the first live entry, and later expired ones wait their turn
        # (they are still treated as expired when looked up).
        expiry = self._expiry
        while expiry:
            key, expires = next(iter(expiry.items()))
            if expires > now:
                break
            del expiry[key]
