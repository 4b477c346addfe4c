"""Router metrics per app, as Heroku's router shows them: requests by status class, latency
percentiles, held requests, retries. Latencies go into fixed log-spaced buckets (constant
memory, one list index per request); percentiles are read from the buckets, so they are
upper bounds within a bucket's width (~10%)."""

from __future__ import annotations

import bisect
import math

BUCKETS = tuple(round(0.0001 * 1.1 ** i, 7) for i in range(int(math.log(600 / 0.0001, 1.1)) + 2))
"""Upper bounds in seconds, from 0.1 ms to 10 minutes, each 10% above the previous."""


class AppMetrics:
    __slots__ = ("classes", "buckets", "held", "retries", "count", "total")

    def __init__(self) -> None:
        self.classes = [0, 0, 0, 0, 0, 0]  # index = status // 100
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.held = 0
        self.retries = 0
        self.count = 0
        self.total = 0.0

    def percentile(self, q: float) -> float | None:
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank:
                return BUCKETS[min(i, len(BUCKETS) - 1)]
        return BUCKETS[-1]


class Metrics:
    """Per app (None: requests that matched no app)."""

    def __init__(self) -> None:
        self.apps: dict[str | None, AppMetrics] = {}

    def _of(self, app: str | None) -> AppMetrics:
        m = self.apps.get(app)
        if m is None:
            m = self.apps[app] = AppMetrics()
        return m

    def record(self, app: str | None, status: int, seconds: float) -> None:
        m = self._of(app)
        m.classes[min(status // 100, 5)] += 1
        m.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        m.count += 1
        m.total += seconds

    def held(self, app: str) -> None:
        self._of(app).held += 1

    def retried(self, app: str) -> None:
        self._of(app).retries += 1

    def prometheus(self) -> str:
        """The text exposition format (one family per figure, labelled by app)."""
        out = ["# TYPE tally_router_requests_total counter"]
        for app, m in sorted(self.apps.items(), key=lambda kv: kv[0] or ""):
            for cls in range(1, 6):
                out.append(f'tally_router_requests_total{{app="{_label(app)}",'
                           f'class="{cls}xx"}} {m.classes[cls]}')
        for name, attr in (("held", "held"), ("retries", "retries")):
            out.append(f"# TYPE tally_router_{name}_total counter")
            for app, m in sorted(self.apps.items(), key=lambda kv: kv[0] or ""):
                out.append(f'tally_router_{name}_total{{app="{_label(app)}"}} '
                           f"{getattr(m, attr)}")
        out.append("# TYPE tally_router_latency_seconds summary")
        for app, m in sorted(self.apps.items(), key=lambda kv: kv[0] or ""):
            for q in (0.5, 0.95, 0.99):
                p = m.percentile(q)
                if p is not None:
                    out.append(f'tally_router_latency_seconds{{app="{_label(app)}",'
                               f'quantile="{q}"}} {p}')
            out.append(f'tally_router_latency_seconds_count{{app="{_label(app)}"}} {m.count}')
            out.append(f'tally_router_latency_seconds_sum{{app="{_label(app)}"}} '
                       f"{m.total:.6f}")
        return "\n".join(out) + "\n"


def _label(app: str | None) -> str:
    return (app or "").replace("\\", "\\\\").replace('"', '\\"')
