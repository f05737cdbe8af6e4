"""The proxy's request-duration histogram puts each request in the first bucket whose bound
is not below its duration (Prometheus' `le`), the last bucket being +Inf."""

from __future__ import annotations

from bisect import bisect_left

from hypothesis import given
from hypothesis import strategies as st

from sidecar.request_stats import REQUEST_BUCKETS, RequestStats


@given(st.floats(min_value=0.0, max_value=100.0))
def test_a_duration_lands_in_the_first_bucket_not_below_it(seconds):
    stats = RequestStats()
    stats.observe(200, seconds)
    expected = [0] * (len(REQUEST_BUCKETS) + 1)
    expected[bisect_left(REQUEST_BUCKETS, seconds)] = 1
    assert stats.buckets == expected


def test_a_bound_itself_is_in_its_own_bucket_and_past_the_last_is_inf():
    stats = RequestStats()
    for seconds in (REQUEST_BUCKETS[0], REQUEST_BUCKETS[3], REQUEST_BUCKETS[-1] + 1):
        stats.observe(200, seconds)
    assert stats.buckets[0] == 1
    assert stats.buckets[3] == 1
    assert stats.buckets[-1] == 1
    assert stats.by_status == {200: 3}
