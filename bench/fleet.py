"""Fleet benchmark: the control plane under N simulated hosts, on this machine.

    .venv/bin/python bench/fleet.py [--quick] [--hosts 1000,5000,10000]

For each N: a private ledger cluster (primary + synchronous standby), two relays, the
projectors, the API (gunicorn, 2 workers, `tally serve api`'s threads) and a placer; N
simulated host agents (agents/simulated.py, 2 processes at nice -5: they stand for machines
with CPUs of their own) heartbeating every 5 s over the real API, with their own agent
tokens; 100 apps placed on them. Measured:

- heartbeats/s accepted (202) over a steady window. Baseline, same run: single-event
  appends/s of heartbeats straight to the ledger by 16 threads (what agents did before
  they spoke only to the API: one append per heartbeat).
- heartbeat -> hosts view lag: a probe host beats, waits for the hosts view to show it,
  and beats again 0.05 s later; p99 (of a few hundred: with under 100 samples a p99 is
  the maximum). Baseline: the same before the fleet starts.
- API p99 of an admin's GET /apps/NAME at ~10/s during the window. Baseline: the same
  before the fleet starts.
- placer reconcile after a scale change of 1,000 instances (100 apps' ScaleChanged in one
  transaction): from that append to the last of the 1,000 InstancePlaced. (bench/agents.py
  times decide() alone.)
- ledger growth per hour, from the size of ledger.events and ledger.positions over the
  window (heartbeats dominate; retention removes them on its schedule).
- time to detect the loss of 100 hosts that go silent at once: until the placer's
  HostLost for all 100. The floor is the TTL.
- flaps: HostLost of hosts that never stopped beating, beside the simulator's longest gap
  between two accepted heartbeats of one host: a gap under the TTL with flaps is the
  control plane's fault; a gap over it, heartbeats that did not get through in time.
- CPU ms per accepted heartbeat over the window, by part (API, placer, projectors, relays,
  the ledger's PostgreSQL, the simulator): what a loaded machine does not blur, and where
  the time goes.

Ends with one JSON line: hosts_sustained (the largest N tried whose lag p99 stays under
1 s), lag_p99_ms_at_10k, placer_reconcile_s_at_10k, api_p99_ms_at_10k,
host_loss_detect_s_at_10k, and the figures per N. `--quick`: N = 1,000 only (< 120 s).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import psycopg2  # noqa: E402

from agents.simulated import SimSettings, Simulation  # noqa: E402
from api.auth import create_user  # noqa: E402
from ledger import Ledger, NewEvent  # noqa: E402
from ledger.batch import Item, append_streams  # noqa: E402
from ledger.cluster import Cluster  # noqa: E402
from tally.simulation import host_ids, issue_tokens  # noqa: E402
from tests.conftest import destroy_cluster, make_cluster  # noqa: E402
from tests.fixtures.apps.fleet import (  # noqa: E402
    ControlPlane,
    count_events,
    last_event_id,
    sim_apps,
)
from tests.waiting import wait_until  # noqa: E402

INTERVAL = 5.0
LOST = 100
SCALE_UP = 1000
APPS = 100


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else float("nan")


class Client:
    """One keep-alive HTTP connection with a token (the probes)."""

    def __init__(self, url: str, token: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: Any = None) -> int:
        try:
            self.conn.request(method, path, json.dumps(body) if body is not None else None,
                              self.headers)
            r = self.conn.getresponse()
            r.read()
            return r.status
        except (OSError, http.client.HTTPException):
            self.conn.close()
            return 0


def api_latencies(url: str, token: str, app: str, seconds: float, rate: float = 10) -> list[float]:
    client, out = Client(url, token), []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        if client.call("GET", f"/apps/{app}") == 200:
            out.append((time.perf_counter() - t0) * 1000)
        time.sleep(max(0.0, 1 / rate - (time.perf_counter() - t0)))
    return out


def view_lags(cluster: Cluster, url: str, token: str, host: str, seconds: float) -> list[float]:
    """Heartbeat of the probe host -> the hosts view showing it, in ms."""
    client, lags = Client(url, token), []
    conn = psycopg2.connect(cluster.dsn("tally_reader"))
    conn.autocommit = True
    cur = conn.cursor()

    def seen() -> int:
        cur.execute("SELECT coalesce(heartbeat_position, 0) FROM views.hosts WHERE host_id = %s",
                    (host,))
        row = cur.fetchone()
        return row[0] if row else 0

    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            before = seen()
            t0 = time.perf_counter()
            if client.call("POST", f"/hosts/{host}/heartbeats", {"load": 0.1}) != 202:
                continue
            while seen() == before and time.perf_counter() - t0 < 30:
                time.sleep(0.005)  # 5 ms resolution: a finer poll loads the ledger itself
            lags.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.05)
    finally:
        conn.close()
    return lags


def direct_appends(cluster: Cluster, seconds: float = 3.0, threads: int = 16) -> float:
    """Baseline: one append per heartbeat, straight to the ledger (appends/s)."""
    done, stop = [0] * threads, threading.Event()

    def writer(i: int) -> None:
        with Ledger(cluster.dsn()) as ledger:
            while not stop.is_set():
                ledger.append(f"heartbeat-direct{i}", [NewEvent("HostHeartbeat", {
                    "host_id": f"direct{i}", "load": 0.5})])
                done[i] += 1

    workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    return sum(done) / seconds


PARTS = ("api", "placer", "projectors", "relay")


def cpu_by_part(cluster: Cluster) -> dict[int, tuple[str, float]]:
    """pid -> (part, CPU seconds so far) of every process of this control plane (the
    `tally serve` daemons and the ledger's PostgreSQL servers with their backends) and of
    the simulator. CPU per heartbeat is what a loaded machine does not blur: the load
    average changes how fast things go, not how much work each heartbeat costs."""
    out: dict[int, tuple[str, float]] = {}

    def note(p: psutil.Process, part: str) -> None:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = (part, t.user + t.system)

    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.cmdline())
            part = next((k for k in PARTS if f"serve {k}" in cmd),
                        "simulator" if "fleet.py" in cmd else None)
            if part:
                note(p, part)
    root = str(cluster.root)
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "postgres" and root in " ".join(p.info["cmdline"] or ()):
            note(p, "ledger")
            for child in p.children():
                note(child, "ledger")
    return out


def cpu_ms_per(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
               count: float) -> dict[str, float]:
    """CPU ms per `count` (heartbeats) by part, from two cpu_by_part readings; `platform`
    is every part but the simulator."""
    spent: dict[str, float] = {}
    for pid, (part, cpu) in after.items():
        spent[part] = spent.get(part, 0.0) + cpu - before.get(pid, (part, 0.0))[1]
    spent["platform"] = sum(v for k, v in spent.items() if k != "simulator")
    return {k: round(v * 1000 / max(count, 1), 3) for k, v in sorted(spent.items())}


def flaps(cluster: Cluster, after_id: int, silent: list[str]) -> int:
    """HostLost of hosts that never stopped beating (not the silenced ones, not the probe,
    which beats only while measuring): false losses, each a host declared lost and back
    at its next heartbeat. Beside the simulator's longest gap between two accepted
    heartbeats of a host, it tells a control plane too slow to fold heartbeats within the
    TTL from a simulator too slow to send them."""
    lost = count_events(cluster, "HostLost", after_id, like="host-%")
    quiet = count_events(cluster, "HostLost", after_id,
                         streams=[f"host-{h}" for h in silent] + ["host-probe"])
    return lost - quiet


def ledger_bytes(cluster: Cluster) -> int:
    conn = psycopg2.connect(cluster.dsn("tally_owner"))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_total_relation_size('ledger.events') + "
                        "pg_total_relation_size('ledger.positions')")
            return cur.fetchone()[0]
    finally:
        conn.close()


def measure(n: int, window: float, ttl: float, logs: Path | None = None) -> dict[str, Any]:
    cluster = make_cluster()
    # hosts beat every INTERVAL: suspect after missing more than one, lost after ttl
    plane = ControlPlane(cluster, ttl=ttl, suspect_after=INTERVAL * 1.5)
    sim = None
    try:
        plane.start()
        url = plane.api.url
        with Ledger(cluster.dsn()) as ledger:
            admin = create_user(ledger, "bench-admin", "admin")
            probe = create_user(ledger, "agent-probe", "agent", "probe")
            apps = sim_apps(ledger, APPS)
            ids = host_ids(n)
            t0 = time.monotonic()
            tokens = issue_tokens(ledger, ids)
            print(f"  N={n}: {n} agent tokens issued in {time.monotonic() - t0:.1f}s",
                  file=sys.stderr)
        Client(url, probe).call("PUT", "/hosts/probe", {
            "address": "127.0.0.1", "port_min": 1, "port_max": 1, "capacity": 0})
        wait_until(lambda: view_lags(cluster, url, probe, "probe", 0.1), 60,
                   "the projectors up (the probe's heartbeat in the hosts view)")
        api_latencies(url, admin, apps[0], 2)  # the workers' first read of the new tokens
        base_api = api_latencies(url, admin, apps[0], 5)
        base_lag = view_lags(cluster, url, probe, "probe", 5)
        base_direct = direct_appends(cluster)

        sim = Simulation(tokens, SimSettings(url, INTERVAL, nice=-5), processes=2,
                         silent_hosts=ids[:LOST])
        begun = last_event_id(cluster)
        t0 = time.monotonic()
        sim.start()
        print(f"  N={n}: registered in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        wait_until(lambda: count_events(cluster, "InstanceHealthy", 0) >= APPS,
                   120, "the apps' instances healthy on simulated hosts")
        time.sleep(INTERVAL)  # one whole round of heartbeats before the window

        api: list[float] = []
        lags: list[float] = []
        threads = [threading.Thread(target=lambda: api.extend(
                       api_latencies(url, admin, apps[0], window))),
                   threading.Thread(target=lambda: lags.extend(
                       view_lags(cluster, url, probe, "probe", window)))]
        cpu0 = cpu_by_part(cluster)
        size0, c0, w0 = ledger_bytes(cluster), sim.counts(), time.monotonic()
        load0 = os.getloadavg()[0]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        size1, c1, w1 = ledger_bytes(cluster), sim.counts(), time.monotonic()
        cpu = cpu_ms_per(cpu0, cpu_by_part(cluster), c1.heartbeats - c0.heartbeats)
        rate = (c1.heartbeats - c0.heartbeats) / (w1 - w0)
        load = [load0, os.getloadavg()[0]]

        flaps_window = flaps(cluster, begun, ids[:LOST])
        mark = last_event_id(cluster)
        with Ledger(cluster.dsn()) as ledger:
            t0 = time.monotonic()  # one change (one transaction) of 1,000 instances
            append_streams(ledger, [Item(f"app-{app}", NewEvent("ScaleChanged", {
                "app": app, "scale": {"web": 1 + SCALE_UP // APPS}})) for app in apps])
        wait_until(lambda: count_events(cluster, "InstancePlaced", mark) >= SCALE_UP, 300,
                   f"{SCALE_UP} more instances placed")
        reconcile = time.monotonic() - t0

        mark = last_event_id(cluster)
        t0 = time.monotonic()
        sim.silent.set()
        silent = [f"host-{h}" for h in ids[:LOST]]
        wait_until(lambda: count_events(cluster, "HostLost", mark, streams=silent) >= LOST,
                   ttl + 120, f"{LOST} hosts lost")
        detect = time.monotonic() - t0
        c2 = sim.counts()
        flaps_total = flaps(cluster, begun, ids[:LOST])
        return {
            "hosts": n, "offered_per_s": n / INTERVAL, "heartbeats_per_s": round(rate, 1),
            "direct_appends_per_s": round(base_direct, 1),
            "lag_p99_ms": round(p99(lags), 1), "lag_p50_ms": round(statistics.median(lags), 1),
            "lag_p99_ms_idle": round(p99(base_lag), 1), "lag_samples": len(lags),
            "lag_p90_ms": round(statistics.quantiles(lags, n=10)[8], 1)
            if len(lags) >= 2 else None, "lag_max_ms": round(max(lags, default=0.0), 1),
            "api_p99_ms": round(p99(api), 1), "api_p99_ms_idle": round(p99(base_api), 1),
            "placer_reconcile_s": round(reconcile, 2), "host_loss_detect_s": round(detect, 2),
            "ttl_s": ttl, "ledger_mb_per_hour": round((size1 - size0) / (w1 - w0) * 3600
                                                      / 2**20, 1),
            "refused": c2.refused, "failed": c2.failed,
            "flaps_to_window_end": flaps_window, "flaps": flaps_total,
            "sim_max_gap_s": round(c2.max_gap_ms / 1000, 1), "sim_late_beats": c2.late,
            "cpu_ms_per_heartbeat": cpu, "load_average_window": load,
        }
    finally:
        if sim is not None:
            sim.close()
        plane.stop()
        if logs is not None:  # the daemons' logs, before their home goes
            (logs / f"n{n}").mkdir(parents=True, exist_ok=True)
            for f in cluster.root.parent.glob("*.log"):
                shutil.copy(f, logs / f"n{n}" / f.name)
        destroy_cluster(cluster)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1,000 only (< 120 s)")
    parser.add_argument("--hosts", default="1000,5000,10000")
    parser.add_argument("--logs", type=Path, help="copy the control plane's logs here")
    args = parser.parse_args()
    sizes = [1000] if args.quick else [int(x) for x in args.hosts.split(",")]
    window, ttl = (15.0, 3 * INTERVAL) if args.quick else (40.0, 3 * INTERVAL)
    print(f"load average before: {os.getloadavg()[0]:.1f}", file=sys.stderr)
    results = []
    for n in sizes:
        r = measure(n, window, ttl, args.logs)
        results.append(r)
        print(json.dumps(r), file=sys.stderr)
    print(f"{'figure':34}" + "".join(f"{'N=' + format(r['hosts'], ','):>12}" for r in results))
    rows = [
        ("heartbeats/s offered", "offered_per_s"), ("heartbeats/s accepted", "heartbeats_per_s"),
        ("  baseline: direct appends/s", "direct_appends_per_s"),
        ("lag heartbeat->view p99 ms", "lag_p99_ms"),
        ("  p50 ms", "lag_p50_ms"), ("  max ms", "lag_max_ms"),
        ("  baseline: idle p99 ms", "lag_p99_ms_idle"),
        ("API GET /apps/NAME p99 ms", "api_p99_ms"), ("  baseline: idle p99 ms", "api_p99_ms_idle"),
        ("placer reconcile +1,000 s", "placer_reconcile_s"),
        ("loss of 100 hosts detected s", "host_loss_detect_s"), ("  floor: TTL s", "ttl_s"),
        ("ledger growth MB/hour", "ledger_mb_per_hour"),
        ("hosts lost while beating (flaps)", "flaps"),
        ("  of which before the scale change", "flaps_to_window_end"),
        ("simulator: longest beat gap s", "sim_max_gap_s"),
    ]
    for label, key in rows:
        print(f"{label:34}" + "".join(f"{r[key]:>12,}" for r in results))
    for r in results:
        print(f"N={r['hosts']:,}: CPU ms per accepted heartbeat (load average "
              f"{r['load_average_window'][0]:.1f} -> {r['load_average_window'][1]:.1f}): "
              + ", ".join(f"{k} {v}" for k, v in r["cpu_ms_per_heartbeat"].items()))
    for r in results:
        offered = r["heartbeats_per_s"] / r["offered_per_s"]
        print(f"N={r['hosts']:,}: accepted/offered {offered:.2f}, "
              f"accepted/direct {r['heartbeats_per_s'] / r['direct_appends_per_s']:.2f}, "
              f"API p99 / idle {r['api_p99_ms'] / r['api_p99_ms_idle']:.2f}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    at = {r["hosts"]: r for r in results}
    big = at.get(10000, {})
    sustained = max([r["hosts"] for r in results if r["lag_p99_ms"] < 1000], default=0)
    print(json.dumps({
        "hosts_sustained": sustained, "lag_p99_ms_at_10k": big.get("lag_p99_ms"),
        "placer_reconcile_s_at_10k": big.get("placer_reconcile_s"),
        "api_p99_ms_at_10k": big.get("api_p99_ms"),
        "host_loss_detect_s_at_10k": big.get("host_loss_detect_s"),
        "per_n": results}))


if __name__ == "__main__":
    main()
