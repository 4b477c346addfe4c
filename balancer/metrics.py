"""Router metrics per app, as Heroku's router shows them: requests by status class, latency
percentiles, held requests, retries. Latencies go into the platform's fixed log-spaced
buckets (ledger/latency.py); percentiles are read from them. `/metrics` shows them since the
process started; `samples` gives what happened since the last samples stored, which the
balancer sends to the API for `tally stats`."""

from __future__ import annotations

from ledger.latency import BUCKETS, bucket_of
from ledger.latency import percentile as bucket_percentile


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
        return bucket_percentile(self.buckets, q)


class Metrics:
    """Per app (None: requests that matched no app)."""

    def __init__(self) -> None:
        self.apps: dict[str | None, AppMetrics] = {}
        self._sent: dict[str, tuple[list[int], list[int], int, int, int, float]] = {}

    def samples(self) -> tuple[list[dict], dict]:
        """What happened per app since the last `sent` (the platform's stats samples:
        requests by status class, held, retries, latency sum and the non-empty latency
        buckets), and the mark to pass to `sent` once they are stored."""
        out, mark = [], {}
        for app, m in self.apps.items():
            if app is None:
                continue
            now = (list(m.classes), list(m.buckets), m.held, m.retries, m.count, m.total)
            before = self._sent.get(app)
            if before is None:
                before = ([0] * 6, [0] * len(m.buckets), 0, 0, 0, 0.0)
            if now[4] == before[4] and now[2:4] == before[2:4]:
                continue
            out.append({
                "app": app, "requests": now[4] - before[4],
                **{f"s{c}xx": now[0][c] - before[0][c] for c in range(1, 6)},
                "held": now[2] - before[2], "retries": now[3] - before[3],
                "latency_sum": round(now[5] - before[5], 6),
                "buckets": {str(i): n - b for i, (n, b) in enumerate(zip(now[1], before[1],
                                                                       strict=True)) if n > b}})
            mark[app] = now
        return out, mark

    def sent(self, mark: dict) -> None:
        """The samples made with this mark are stored: the next ones start from it."""
        self._sent.update(mark)

    def _of(self, app: str | None) -> AppMetrics:
        m = self.apps.get(app)
        if m is None:
            m = self.apps[app] = AppMetrics()
        return m

    def record(self, app: str | None, status: int, seconds: float) -> None:
        m = self._of(app)
        m.classes[min(status // 100, 5)] += 1
        m.buckets[bucket_of(seconds)] += 1
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
