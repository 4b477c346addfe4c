"""Ledger benchmark: appends/s beside a raw INSERT of equally sized rows, and wake-up latency.

    .venv/bin/python bench/ledger.py [--quick]

Everything runs in one private cluster (primary + synchronous standby) with two relays up,
as in production. Each figure is the median of several alternating rounds of ours and the
baseline, so both see the same machine. At 16 writers a second baseline, pgbench
(`-M prepared`, 16 clients) inserting the same rows, shows where the server stands: the
Python-client baseline pays the same client costs as we do. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
from psycopg2.extras import execute_values

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ledger import Ledger, NewEvent  # noqa: E402
from ledger.cluster import Cluster  # noqa: E402
from ledger.subscriber import Subscriber  # noqa: E402
from tests.conftest import RelayProcs, destroy_cluster, make_cluster  # noqa: E402

PAYLOAD = {"host_id": "bench-host-00", "load": 0.42, "memory_used_mb": 812,
           "memory_total_mb": 4096, "instances": 3}
# The baseline table mirrors ledger.events' columns with only a primary key: a raw INSERT.
BASELINE_DDL = """
DROP TABLE IF EXISTS public.bench_raw;
CREATE TABLE public.bench_raw (
    id bigserial PRIMARY KEY, stream text NOT NULL, category text NOT NULL,
    version integer NOT NULL, type text NOT NULL, data jsonb NOT NULL,
    metadata jsonb NOT NULL, recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    idempotency_key text);
GRANT ALL ON public.bench_raw, public.bench_raw_id_seq TO tally_writer;
"""


@contextmanager
def bench_cluster() -> Iterator[tuple[Cluster, list[str]]]:
    """A private migrated cluster (the tests' own) with two relays; removed afterwards."""
    cluster = make_cluster()
    relays = RelayProcs(cluster)
    try:
        for i in range(2):
            relays.start(i)
            relays.wait_ready(i)
        conn = psycopg2.connect(cluster.dsn("tally_owner"))
        conn.autocommit = True
        conn.cursor().execute(BASELINE_DDL)
        conn.close()
        yield cluster, relays.endpoints
    finally:
        relays.stop()
        destroy_cluster(cluster)


# --- workers: each runs for `duration` seconds from `start_at`, returns events written ------

def ours(dsn: str, worker: int, batch: int, start_at: float, duration: float) -> int:
    stream = f"heartbeat-b{uuid.uuid4().hex[:8]}w{worker}"
    events = [NewEvent("HostHeartbeat", PAYLOAD)] * batch
    with Ledger(dsn) as ledger:
        ledger.append(stream, events)  # connect and prepare outside the timed window
        n = 0
        time.sleep(max(0.0, start_at - time.time()))
        end = start_at + duration
        while time.time() < end:
            ledger.append(stream, events)
            n += batch
    return n


def raw(dsn: str, worker: int, batch: int, start_at: float, duration: float) -> int:
    stream = f"heartbeat-r{uuid.uuid4().hex[:8]}w{worker}"
    conn = psycopg2.connect(dsn)
    conn.autocommit = batch == 1
    cur = conn.cursor()
    n, version = 0, 0
    time.sleep(max(0.0, start_at - time.time()))
    end = start_at + duration
    while time.time() < end:
        rows = []
        for _ in range(batch):
            version += 1
            rows.append((stream, "heartbeat", version, "HostHeartbeat", json.dumps(PAYLOAD),
                         '{"schema": 1}', uuid.uuid4().hex))
        if batch == 1:
            cur.execute("INSERT INTO public.bench_raw (stream, category, version, type, data, "
                        "metadata, idempotency_key) VALUES (%s,%s,%s,%s,%s,%s,%s)", rows[0])
        else:
            execute_values(cur, "INSERT INTO public.bench_raw (stream, category, version, "
                           "type, data, metadata, idempotency_key) VALUES %s", rows,
                           page_size=batch)
            conn.commit()
        n += batch
    conn.close()
    return n


PGBENCH_SCRIPT = (
    "\\set v random(1, 2000000000)\n"
    "INSERT INTO public.bench_raw (stream, category, version, type, data, metadata, "
    "idempotency_key) VALUES ('heartbeat-pgb' || :client_id, 'heartbeat', :v, "
    f"'HostHeartbeat', '{json.dumps(PAYLOAD)}', '{{\"schema\": 1}}', md5(:v::text || "
    "random()::text));\n"
)


def pgbench_rate(cluster: Cluster, clients: int, duration: float) -> float:
    """Inserts/s of pgbench -M prepared with `clients` clients, same rows as `raw`."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
        script.write(PGBENCH_SCRIPT)
        script.flush()
        out = subprocess.run(
            [str(cluster.spec.bin_dir / "pgbench"), "-n", "-M", "prepared", "-c", str(clients),
             "-j", "2", "-T", str(max(1, round(duration))), "-f", script.name, cluster.dsn()],
            capture_output=True, text=True, check=True).stdout
    return float(re.search(r"tps = ([\d.]+)", out).group(1))


def _run_worker(args: tuple) -> int:
    fn, *rest = args
    return fn(*rest)


def rate(pool: mp.pool.Pool, fn: Callable, dsn: str, writers: int, batch: int,
         duration: float) -> float:
    start_at = time.time() + 0.5
    counts = pool.map(_run_worker, [(fn, dsn, w, batch, start_at, duration)
                                    for w in range(writers)])
    return sum(counts) / duration


def wakeup_latencies(cluster: Cluster, endpoints: list[str], samples: int) -> list[float]:
    """Seconds from an append's acknowledgement to a relay's wake-up covering it."""
    sub = Subscriber(endpoints)
    out = []
    with Ledger(cluster.dsn()) as ledger:
        stream = f"heartbeat-wake{uuid.uuid4().hex[:6]}"
        ledger.append(stream, [NewEvent("HostHeartbeat", PAYLOAD)])
        target = ledger.sequence()
        while sub.head < target:
            sub.wait(1.0)
        for _ in range(samples):
            before = sub.head
            ledger.append(stream, [NewEvent("HostHeartbeat", PAYLOAD)])
            t0 = time.perf_counter()
            while sub.head <= before:
                if sub.wait(2.0) is None:
                    raise SystemExit("no wake-up within 2 s: relays down?")
            out.append(time.perf_counter() - t0)
            time.sleep(0.005)
    sub.close()
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (<60 s)")
    args = parser.parse_args()
    # Many short rounds rather than a few long ones: this machine's speed swings by a third
    # within seconds, so more pairs give a steadier median (one run of 32 pairs of 1.5 s:
    # groups of 8 pairs gave 0.77-0.96 for the same code).
    rounds, duration, samples = (2, 1.5, 150) if args.quick else (15, 2.0, 1000)
    cases = [("single, 1 writer", 1, 1, "c1"), ("single, 16 writers", 16, 1, "c16"),
             ("batch of 100, 1 writer", 1, 100, "batch100")]
    results = {}
    with bench_cluster() as (cluster, endpoints), mp.get_context("fork").Pool(16) as pool:
        dsn = cluster.dsn()
        for label, writers, batch, key in cases:
            ours_r, raw_r, pgb_r = [], [], []
            for _ in range(rounds):
                raw_r.append(rate(pool, raw, dsn, writers, batch, duration))
                ours_r.append(rate(pool, ours, dsn, writers, batch, duration))
                if key == "c16":
                    pgb_r.append(pgbench_rate(cluster, writers, duration))
            results[key] = (label, statistics.median(ours_r), statistics.median(raw_r))
            if pgb_r:
                pgbench_c16 = statistics.median(pgb_r)
                print("pgbench, 16 clients: " + "  ".join(f"{r:,.0f}" for r in pgb_r),
                      file=sys.stderr)
            # Each round's pair, so a reader sees how much this machine drifted.
            print(f"{label}: " + "  ".join(f"{o:,.0f}/{r:,.0f}"
                                           for o, r in zip(ours_r, raw_r, strict=True)),
                  file=sys.stderr)
        lat = wakeup_latencies(cluster, endpoints, samples)

    print(f"{'case':<26}{'tally append/s':>16}{'raw INSERT/s':>16}{'ratio':>8}")
    for label, o, r in results.values():
        print(f"{label:<26}{o:>16,.0f}{r:>16,.0f}{o / r:>8.2f}")
    ours_c16 = results["c16"][1]
    print(f"{'single, 16 writers':<26}{ours_c16:>16,.0f}{pgbench_c16:>16,.0f}"
          f"{ours_c16 / pgbench_c16:>8.2f}  (pgbench -M prepared -c 16)")
    p50, p99 = pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000
    print(f"relay wake-up after append: p50 {p50:.2f} ms, p99 {p99:.2f} ms ({len(lat)} samples)")
    print(json.dumps({
        "append_ratio_c1": round(results["c1"][1] / results["c1"][2], 3),
        "append_ratio_c16": round(results["c16"][1] / results["c16"][2], 3),
        "append_ratio_pgbench_c16": round(ours_c16 / pgbench_c16, 3),
        "append_ratio_batch100": round(results["batch100"][1] / results["batch100"][2], 3),
        "wakeup_p50_ms": round(p50, 2),
        "wakeup_p99_ms": round(p99, 2),
        "appends_per_s_c16": round(results["c16"][1]),
    }))


if __name__ == "__main__":
    main()
