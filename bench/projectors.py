"""Projector benchmark: rebuilding every view from a realistic ledger, beside the read
ceiling (one plain SELECT of the same events, in the same run), and the live lag from
append to view row under a steady 500 appends/s.

    .venv/bin/python bench/projectors.py [--quick] [--events N]

A private cluster (primary + synchronous standby) is filled with a fleet's history
(bench/synthetic.py: heartbeats, placements, instance events, releases...) by batch
appends of up to 1000 events. Rebuild and read alternate for a few rounds; each figure is
the median. Live lag runs `tally serve projectors` with two relays, as in production: lag is
the time from an event's `recorded_at` (the append) to the first moment every projector's
checkpoint covers it, polled every ~2 ms (so it overstates by up to that much).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import projectors  # noqa: E402
from bench.synthetic import fleet_history  # noqa: E402
from ledger import Ledger, NewEvent  # noqa: E402
from ledger.cluster import Cluster  # noqa: E402
from projectors.rebuild import rebuild  # noqa: E402
from tests.conftest import RelayProcs, destroy_cluster, make_cluster, tally_env  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

WRITERS = 4
READ_ALL = """SELECT p.position, e.id, e.stream, e.version, e.type, e.data, e.metadata,
    e.recorded_at FROM ledger.positions p JOIN ledger.events e ON e.id = p.event_id
    ORDER BY p.position"""


def fill(cluster: Cluster, n_events: int) -> dict[str, int]:
    """Append the history with a few writers; each stream stays with one writer, in order."""
    lanes: list[list[tuple[str, list[NewEvent]]]] = [[] for _ in range(WRITERS)]
    mix: dict[str, int] = {}
    for stream, events in fleet_history(n_events, hosts=20, apps=50):
        lanes[zlib.crc32(stream.encode()) % WRITERS].append((stream, events))
        for e in events:
            mix[e.type] = mix.get(e.type, 0) + 1

    def write(lane: list[tuple[str, list[NewEvent]]]) -> None:
        with Ledger(cluster.dsn(), notify=False) as ledger:
            for stream, events in lane:
                ledger.append(stream, events)

    with ThreadPoolExecutor(WRITERS) as pool:
        list(pool.map(write, lanes))
    return mix


def read_ceiling(dsn: str) -> float:
    """Events/s of one plain SELECT of every event, rows decoded like any reader's."""
    conn = psycopg2.connect(dsn)
    try:
        started = time.perf_counter()
        with conn.cursor(name="bench_read") as cur:
            cur.itersize = 10_000
            cur.execute(READ_ALL)
            count = sum(1 for _ in cur)
        return count / (time.perf_counter() - started)
    finally:
        conn.close()


def timed_rebuild(dsn: str, head: int) -> float:
    started = time.perf_counter()
    rebuild(dsn, projectors.ALL)
    return head / (time.perf_counter() - started)


def live_lag(cluster: Cluster, seconds: float, rate: int) -> dict[str, float]:
    """Append at `rate`/s for `seconds` while the daemon follows; lag percentiles in ms."""
    dsn = cluster.dsn("tally_owner")
    relays = RelayProcs(cluster)
    relays.start(0)
    relays.start(1)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tally.cli", "serve", "projectors", "--poll-interval", "1"],
        env=tally_env(cluster, TALLY_RELAYS=",".join(relays.endpoints)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Ledger(cluster.dsn()) as ledger:
            for i in range(3):  # the daemon is up, subscribed and caught up
                ledger.append("heartbeat-probe", [NewEvent("HostHeartbeat", {"host_id": "p"})])
                start = ledger.sequence()
                wait_until(lambda s=start: _applied(dsn) >= s, 120, f"probe {i} never applied")
            samples: list[tuple[float, int]] = []
            stop = threading.Event()
            poller = threading.Thread(target=_poll, args=(dsn, samples, stop))
            poller.start()
            sent = _append_steadily(cluster, seconds, rate)
            end = ledger.sequence()
            wait_until(lambda: _applied(dsn) >= end, 60, "daemon never caught up")
            stop.set()
            poller.join()
        lags = _lags(dsn, start, end, samples)
    finally:
        daemon.terminate()
        daemon.wait(30)
        relays.stop()
    lags.sort()
    return {"appends_per_s": sent / seconds, "events": len(lags),
            "p50_ms": statistics.median(lags), "p99_ms": lags[int(len(lags) * 0.99) - 1],
            "max_ms": lags[-1]}


def _applied(dsn: str) -> int:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT min(position), count(*) FROM views.projector_checkpoints")
        position, count = cur.fetchone()
    conn.close()
    return position if count == len(projectors.ALL) else -1


def _poll(dsn: str, samples: list[tuple[float, int]], stop: threading.Event) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        while not stop.is_set():
            cur.execute("SELECT extract(epoch FROM clock_timestamp()), min(position) "
                        "FROM views.projector_checkpoints")
            at, position = cur.fetchone()
            samples.append((float(at), position))
            time.sleep(0.002)
    conn.close()


def _append_steadily(cluster: Cluster, seconds: float, rate: int) -> int:
    """Two writers, each at rate/2, one event per append: instance events and heartbeats."""
    def writer(k: int) -> int:
        sent = 0
        interval = 2.0 / rate
        began = time.perf_counter()
        with Ledger(cluster.dsn()) as ledger:
            while (due := began + sent * interval) < began + seconds:
                time.sleep(max(0.0, due - time.perf_counter()))
                n = sent * 2 + k
                if n % 2:
                    ledger.append(f"heartbeat-live{k}", [NewEvent(
                        "HostHeartbeat", {"host_id": f"live{k}", "instances": n % 40})])
                else:
                    iid = f"live{k}-{n}"
                    ledger.append(f"instance-{iid}", [NewEvent(
                        "InstanceStarted", {"instance_id": iid, "host_id": "live", "pid": 100})])
                sent += 1
        return sent

    with ThreadPoolExecutor(2) as pool:
        return sum(pool.map(writer, range(2)))


def _lags(dsn: str, start: int, end: int, samples: list[tuple[float, int]]) -> list[float]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT p.position, extract(epoch FROM e.recorded_at) FROM ledger.positions p "
                    "JOIN ledger.events e ON e.id = p.event_id WHERE p.position > %s "
                    "AND p.position <= %s", (start, end))
        events = cur.fetchall()
    conn.close()
    covered = [position for _, position in samples]  # non-decreasing
    out = []
    for position, recorded in events:
        i = bisect.bisect_left(covered, position)
        if i < len(samples):
            out.append((samples[i][0] - float(recorded)) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer events; under 60 s")
    parser.add_argument("--events", type=int, help="events to rebuild (default 1,000,000)")
    args = parser.parse_args()
    n_events = args.events or (60_000 if args.quick else 1_000_000)
    rounds = 3 if args.quick else 2
    live_seconds = 5.0 if args.quick else 20.0
    cluster = make_cluster()
    try:
        dsn = cluster.dsn("tally_owner")
        t0 = time.perf_counter()
        mix = fill(cluster, n_events)
        with Ledger(dsn) as ledger:
            head = ledger.sequence()
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        with conn.cursor() as cur:  # what autovacuum would have done by now
            cur.execute("VACUUM ANALYZE ledger.events, ledger.positions")
        conn.close()
        fill_s = time.perf_counter() - t0
        reads, rebuilds = [], []
        for _ in range(rounds):
            reads.append(read_ceiling(dsn))
            rebuilds.append(timed_rebuild(dsn, head))
        read_eps, rebuild_eps = statistics.median(reads), statistics.median(rebuilds)
        live = live_lag(cluster, live_seconds, 500)
    finally:
        destroy_cluster(cluster)
    _report(head, mix, fill_s, read_eps, rebuild_eps, live, rounds)


def _report(head: int, mix: dict[str, int], fill_s: float, read_eps: float,
            rebuild_eps: float, live: dict[str, Any], rounds: int) -> None:
    total = sum(mix.values())
    top = ", ".join(f"{t} {n / total:.0%}" for t, n in sorted(mix.items(), key=lambda x: -x[1])[:4])
    ratio = rebuild_eps / read_eps
    print(f"projectors benchmark: {head:,} events ({top}, ...), filled in {fill_s:.0f}s")
    print(f"{'':<46}{'figure':>14}   target")
    print(f"{'read ceiling: one plain SELECT (events/s)':<46}{read_eps:>14,.0f}")
    print(f"{'rebuild into all views (events/s)':<46}{rebuild_eps:>14,.0f}   >= 25,000")
    print(f"{'rebuild / read ceiling':<46}{ratio:>14.2f}   >= 0.30")
    print(f"{'live: appends/s sustained':<46}{live['appends_per_s']:>14.0f}   500")
    print(f"{'live lag append -> view, p50 (ms)':<46}{live['p50_ms']:>14.1f}")
    print(f"{'live lag append -> view, p99 (ms)':<46}{live['p99_ms']:>14.1f}   <= 50")
    print(f"{'live lag append -> view, max (ms)':<46}{live['max_ms']:>14.1f}")
    print(f"(medians of {rounds} alternating rounds; live lag over {live['events']} events)")
    print(json.dumps({"rebuild_events_per_s": round(rebuild_eps), "rebuild_ratio": round(ratio, 3),
                      "live_lag_p99_ms": round(live["p99_ms"], 1),
                      "read_events_per_s": round(read_eps), "events": head}))


if __name__ == "__main__":
    main()
