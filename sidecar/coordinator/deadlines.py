"""How long a call made for a transaction may take: never longer than the transaction has left.

Rules: pure; times are seconds on one monotonic clock that the caller passes in (`now`).
A call made for a transaction gets min(its configured timeout, the transaction's time left)
when the deadline is known; a deadline is known for the transactions this process began (the
begin's timeout, from when the begin was sent: never later than the coordinator's own
deadline, which starts when the begin arrives), or told by a registration's answer. The
map of known deadlines is bounded: entries go when their transaction is decided, a minute
after their deadline (oldest first), or when the map is full; a call about a forgotten
transaction simply gets its configured timeout, as one about an unknown transaction does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Final

#: transactions remembered at once (about 100 bytes each); a sidecar beginning 1,000
#: transactions a second with 60 s timeouts has 60,000 live
DEFAULT_CAPACITY: Final = 100_000
#: seconds an entry stays after its deadline (a late register/report is refused without a
#: call meanwhile; after that the coordinator's own answer says the same)
KEEP_AFTER_DEADLINE: Final = 60.0


def time_left(deadline: float | None, now: float) -> float | None:
    """Seconds until `deadline` (negative once it has passed); None when it is unknown."""
    return None if deadline is None else deadline - now


def call_timeout(configured: float, deadline: float | None, now: float) -> float:
    """min(configured, time left): what a call made for the transaction may take. Zero or
    less means the transaction's time is up and the call should not be made."""
    left = time_left(deadline, now)
    return configured if left is None else min(configured, left)


class Deadlines:
    """XID → deadline of the transactions this process began, oldest first, bounded."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._by_xid: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_xid)

    def remember(self, xid: str, deadline: float, now: float) -> None:
        self._by_xid[xid] = deadline
        self._by_xid.move_to_end(xid)
        while len(self._by_xid) > self.capacity:
            self._by_xid.popitem(last=False)
        # participants never decide: entries long past their deadline go, oldest first
        # (amortised O(1): each entry is dropped once)
        while self._by_xid:
            oldest = next(iter(self._by_xid))
            if self._by_xid[oldest] >= now - KEEP_AFTER_DEADLINE:
                break
            del self._by_xid[oldest]

    def forget(self, xid: str) -> None:
        """The transaction is decided: its deadline no longer bounds anything."""
        self._by_xid.pop(xid, None)

    def get(self, xid: str) -> float | None:
        return self._by_xid.get(xid)

    @property
    def table(self) -> Mapping[str, float]:
        """The XID → deadline mapping itself, read-only, for lookups on the data plane's hot
        path (a dict get, no call)."""
        return self._by_xid
