"""The proxy listeners' request counters, updated once per proxied request.

A module of its own so that mypyc compiles it with the request path (setup.py): the exchange
calls `observe` on every request, and from compiled code an interpreted method call is one
of the last Python frames per request. sidecar/metrics.py exports the counters.
"""

from __future__ import annotations

from typing import Final

#: request-duration buckets (seconds): loopback proxying sits in the first few. Typed as a
#: tuple of any length: with its exact length inferred, mypyc keeps it as a C struct of
#: doubles and boxes all fifteen into a new tuple wherever it is used as an object
REQUEST_BUCKETS: Final[tuple[float, ...]] = (
    *(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05),
    *(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


class RequestStats:
    """Requests of one (listener, upstream): counts by status and a duration histogram."""

    def __init__(self) -> None:
        self.by_status: dict[int, int] = {}
        #: per bucket, not cumulative; the last is +Inf
        self.buckets: list[int] = [0] * (len(REQUEST_BUCKETS) + 1)
        self.total_seconds = 0.0

    def observe(self, status: int, seconds: float) -> None:
        by_status = self.by_status
        by_status[status] = by_status.get(status, 0) + 1
        # the first bucket whose bound is not below it (bisect_left's answer; a loop, as
        # loopback requests end in the first buckets, and a call to bisect costs more)
        i = 0
        for bound in REQUEST_BUCKETS:
            if seconds <= bound:
                break
            i += 1
        self.buckets[i] += 1
        self.total_seconds += seconds
