"""Request latencies as the router measures them and the platform stores them: counts in
fixed log-spaced buckets (constant memory, one list index per request), from which any
percentile is read, for one balancer's window or for many samples added together. A
percentile is an upper bound within its bucket's width (~10%).

The balancer counts (balancer/metrics.py), the stats store adds samples up and reads the
percentiles `tally stats` shows (agents/stats.py): one definition of the buckets for both.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

BUCKETS = tuple(round(0.0001 * 1.1 ** i, 7) for i in range(int(math.log(600 / 0.0001, 1.1)) + 2))
"""Upper bounds in seconds, from 0.1 ms to 10 minutes, each 10% above the previous; one more
bucket (index len(BUCKETS)) holds what is slower."""


def bucket_of(seconds: float) -> int:
    return bisect.bisect_left(BUCKETS, seconds)


def percentile(buckets: Sequence[int], q: float) -> float | None:
    """The q-th quantile (0..1) of the counts in `buckets`, in seconds (None: no count)."""
    count = sum(buckets)
    if not count:
        return None
    rank, seen = q * count, 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= rank:
            return BUCKETS[min(i, len(BUCKETS) - 1)]
    return BUCKETS[-1]
