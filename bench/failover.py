"""Failover benchmark: kill -9 of the leader's postmaster to the first acknowledged append on
the new leader, acknowledged appends lost, and what Patroni costs at 16 writers.

    .venv/bin/python bench/failover.py [--quick]

A Patroni cluster (etcd + two nodes, tally's timings) and a plain one (primary + synchronous
standby, no Patroni) run side by side. Failover: 4 writers append with idempotency keys
(sending a failed append again with its key); the leader's postmaster is killed; the figure
is the time to the first append acknowledged by the new leader (the connection's server
port tells which node answered), median of the rounds. Every acknowledged key is then
looked up on the leader: `acked_lost` must be 0. Throughput: alternating rounds of 16
writer processes on each cluster; the ratio is Patroni's appends/s over plain's. Ends with
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ledger import PAYLOAD, ours, rate  # noqa: E402
from ledger import Ledger, LedgerUnavailable, NewEvent  # noqa: E402
from ledger.patroni import PatroniCluster  # noqa: E402
from tests.conftest import destroy_cluster, make_cluster  # noqa: E402
from tests.patroni import destroy_patroni_cluster, healthy, make_patroni_cluster  # noqa: E402


class Writer(threading.Thread):
    """Appends until stopped; a failed append is sent again with the same key. Records
    each acknowledgement as (key, monotonic time, server port)."""

    def __init__(self, dsn: str, n: int) -> None:
        super().__init__(daemon=True)
        self.ledger = Ledger(dsn, retry_deadline=120, confirm_timeout=5)
        self.n = n
        self.acked: list[tuple[str, float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            key = f"fo-{uuid.uuid4().hex[:6]}-{self.n}-{i}"
            while True:
                try:
                    self.ledger.append(f"heartbeat-fo{self.n}", [NewEvent(
                        "HostHeartbeat", PAYLOAD)], idempotency_key=key)
                    break
                except LedgerUnavailable:
                    continue
            self.acked.append((key, time.monotonic(), self.ledger.connection().info.port))
        self.ledger.close()


def failover_round(cluster: PatroniCluster, writers: list[Writer]) -> float:
    """Seconds from kill -9 of the leader's postmaster to the first append acknowledged
    by the new leader."""
    old = healthy(cluster, 180)
    new_port = cluster.port(cluster.other(old))
    counts = [len(w.acked) for w in writers]
    while any(len(w.acked) < c + 10 for w, c in zip(writers, counts, strict=True)):
        time.sleep(0.05)
    killed = time.monotonic()
    os.kill(cluster.postmaster_pid(old), signal.SIGKILL)
    while True:
        firsts = [t for w in writers for _, t, port in w.acked[-50:]
                  if t > killed and port == new_port]
        if firsts:
            return min(firsts) - killed
        if time.monotonic() - killed > 120:
            raise SystemExit("no append acknowledged by the new leader within 120 s")
        time.sleep(0.01)


def lost(cluster: PatroniCluster, writers: list[Writer]) -> int:
    acked = {key for w in writers for key, _, _ in w.acked}
    conn = psycopg2.connect(cluster.dsn("tally_owner"))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT idempotency_key FROM ledger.events WHERE idempotency_key "
                        "= ANY(%s)", (list(acked),))
            found = {k for (k,) in cur.fetchall()}
    finally:
        conn.close()
    return len(acked - found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (< 120 s)")
    args = parser.parse_args()
    failovers, rounds, duration = (1, 2, 1.5) if args.quick else (5, 7, 2.0)
    made: list = []  # the plain cluster is made while Patroni bootstraps the other
    maker = threading.Thread(target=lambda: made.append(make_cluster()))
    maker.start()
    ha = make_patroni_cluster("tally-bench-ha-")
    maker.join()
    plain = made[0]
    try:
        with mp.get_context("fork").Pool(16) as pool:
            ha_r, plain_r = [], []
            for _ in range(rounds):
                healthy(ha, 180)
                plain_r.append(rate(pool, ours, plain.dsn(), 16, 1, duration))
                ha_r.append(rate(pool, ours, ha.dsn(), 16, 1, duration))
            print("16 writers, patroni/plain: " + "  ".join(
                f"{h:,.0f}/{p:,.0f}" for h, p in zip(ha_r, plain_r, strict=True)),
                file=sys.stderr)
        writers = [Writer(ha.dsn(), n) for n in range(4)]
        for w in writers:
            w.start()
        times = []
        for _ in range(failovers):
            times.append(failover_round(ha, writers))
            print(f"failover: {times[-1]:.2f} s", file=sys.stderr)
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(120)
        acked_lost = lost(ha, writers)
    finally:
        destroy_cluster(plain)
        destroy_patroni_cluster(ha)
        shutil.rmtree(ha.root.parent, ignore_errors=True)

    p50 = statistics.median(times)
    ha_rate, plain_rate = statistics.median(ha_r), statistics.median(plain_r)
    print(f"{'case':<34}{'patroni':>12}{'plain':>12}{'ratio':>8}")
    print(f"{'appends/s, 16 writers':<34}{ha_rate:>12,.0f}{plain_rate:>12,.0f}"
          f"{ha_rate / plain_rate:>8.2f}")
    print(f"failover (kill -9 postmaster -> first ack on the new leader): median "
          f"{p50:.2f} s of {len(times)}; acknowledged appends lost: {acked_lost} of "
          f"{sum(len(w.acked) for w in writers)}")
    print(json.dumps({"failover_p50_s": round(p50, 2), "acked_lost": acked_lost,
                      "ha_overhead_ratio": round(ha_rate / plain_rate, 3)}))


if __name__ == "__main__":
    main()
