"""Add-ons benchmark: how long an add-on takes to be usable, an app's failover window
through its DATABASE_URL, and what the stable address costs in queries/s.

    .venv/bin/python bench/addons.py [--quick]

One apps' cluster under Patroni behind its stable address (agents/appsdb.py, tally's
timings: the kernel NAT when run as root with nftables, else HAProxy; `--via` chooses) in a
temporary home. `addon_create_s`: from asking for a PostgreSQL database and a Redis (what
the API host runs for `addons:create`, without the ledger append) to a query through
DATABASE_URL and a PING through REDIS_URL answering, the cluster already made (its first
bootstrap is printed beside). Failover: an app writes through its DATABASE_URL, reconnecting
after any error, as a web app's connection pool does; the leader's postmaster is killed -9;
the window is from the kill to the app's first successful write, median of the rounds.
Proxy: pgbench select-only (4 clients) through the stable address vs straight to the
primary's port, in pairs of rounds (each pair's order alternating); `proxy_ratio` is the
median of the pairs' ratios of the stable address's tps over the direct one's (target >=
0.9: at most 10% overhead). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents import addons, appsdb, redisaddon  # noqa: E402
from ledger.cluster import DEFAULT_BIN, ClusterSpec  # noqa: E402
from tests.conftest import free_port_range, free_ports  # noqa: E402


def make_cluster(home: Path, via: str | None) -> appsdb.AppsCluster:
    a, b, proxy, *ha = free_ports(7)
    cluster = appsdb.AppsCluster(
        ClusterSpec(home / "appsdb", ports=(a, b), dbname="tally_apps", ledger=False,
                    extra_settings=dict(appsdb.PRIVATE_LOGS), os_user=appsdb.SERVER_USER),
        (ha[0], ha[1], ha[2], ha[3]), proxy_port=proxy, via=via)
    cluster.init()
    cluster.ha.wait_members(2, 180)
    return cluster


def usable(url: str, redis_url: str | None = None, timeout: float = 60) -> None:
    """Until a query through `url` (and a PING through `redis_url`) answers."""
    import redis

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg2.connect(url, connect_timeout=2) as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
            conn.close()
            if redis_url:
                client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
                client.ping()
                client.close()
            return
        except (psycopg2.Error, redis.RedisError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def create_time(cluster: appsdb.AppsCluster, home: Path, app: str) -> float:
    start = time.monotonic()
    url = addons.create_database(cluster, app)
    redis_url, _ = redisaddon.create(home / "redis", app, "mini", free_port_range(1))
    usable(url, redis_url)
    return time.monotonic() - start


def failover_window(cluster: appsdb.AppsCluster, url: str) -> float:
    """kill -9 of the leader's postmaster to the app's first successful write on the new
    leader (the server port behind the stable address tells which node answered)."""
    old_port = cluster.port(cluster.primary())
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS writes (at timestamptz DEFAULT now())")
    conn.close()
    conn = psycopg2.connect(url)
    conn.autocommit = True
    os.kill(appsdb.leader_postmaster(cluster), signal.SIGKILL)
    killed = time.monotonic()
    while True:
        try:
            with conn.cursor() as cur:
                cur.execute("INSERT INTO writes DEFAULT VALUES RETURNING inet_server_port()")
                if cur.fetchone()[0] != old_port:
                    break
        except psycopg2.Error:
            conn.close()
            try:
                conn = psycopg2.connect(url, connect_timeout=2)
                conn.autocommit = True
            except psycopg2.Error:
                time.sleep(0.02)
        time.sleep(0.01)
    window = time.monotonic() - killed
    conn.close()
    cluster.ha.wait_members(2, 180)  # the old primary rejoins before the next round
    return window


def pgbench_tps(url: str, seconds: int, mode: str = "-S") -> float:
    """pgbench's tps through `url`: -S select-only (each query a round trip: the proxy's
    worst case), -N simple updates (more work per round trip)."""
    parts = urlsplit(url)
    env = {**os.environ, "PGPASSWORD": parts.password or ""}
    args = ["-h", parts.hostname or "", "-p", str(parts.port), "-U", parts.username or "",
            parts.path.lstrip("/")]
    out = subprocess.run([str(DEFAULT_BIN / "pgbench"), "-n", mode, "-c", "4", "-j", "2",
                          "-T", str(seconds), *args], env=env, capture_output=True,
                         text=True, check=True).stdout
    return float(re.search(r"tps = ([\d.]+)", out).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (< 120 s)")
    parser.add_argument("--via", choices=("nat", "haproxy"),
                        help="the stable address (default: nat as root with nft)")
    args = parser.parse_args()
    rounds, seconds = (1, 3) if args.quick else (3, 8)
    home = Path(tempfile.mkdtemp(prefix="tally-bench-addons-"))
    home.chmod(0o755)
    started = time.monotonic()
    cluster = make_cluster(home, args.via)
    try:
        bootstrap = time.monotonic() - started
        creates = [create_time(cluster, home, f"bench-{i}") for i in range(rounds)]
        url = addons.create_database(cluster, "bench-app")
        parts = urlsplit(url)
        env = {**os.environ, "PGPASSWORD": parts.password or ""}
        subprocess.run([str(DEFAULT_BIN / "pgbench"), "-i", "-s", "5", "-q", "-h",
                        parts.hostname or "", "-p", str(parts.port), "-U",
                        parts.username or "", parts.path.lstrip("/")], env=env,
                       capture_output=True, check=True)
        direct_url = url.replace(f":{cluster.proxy_port}/",
                                 f":{cluster.port(cluster.primary())}/")
        proxied, direct = [], []
        for i in range(3 if args.quick else 6):  # pairs, each order in turn: drift cancels
            first, second = (direct, proxied) if i % 2 == 0 else (proxied, direct)
            for into in (first, second):
                into.append(pgbench_tps(direct_url if into is direct else url, seconds))
        writes = {"direct": [], "proxy": []}
        for _ in range(0 if args.quick else 2):
            writes["direct"].append(pgbench_tps(direct_url, seconds, "-N"))
            writes["proxy"].append(pgbench_tps(url, seconds, "-N"))
        windows = [failover_window(cluster, url) for _ in range(rounds)]
        print(f"{'case':<44}{'figure':>12}")
        print(f"{'apps cluster bootstrap (Patroni, first add-on)':<44}{bootstrap:>11.1f}s")
        print(f"{'addons:create to usable URLs (pg + redis)':<44}"
              f"{statistics.median(creates):>11.2f}s")
        print(f"{'pgbench -S tps, straight to the primary':<44}{statistics.median(direct):>12,.0f}")
        print(f"{'pgbench -S tps, through the ' + cluster.via:<44}"
              f"{statistics.median(proxied):>12,.0f}")
        # the median of each pair's ratio: a burst of other work on the machine touches
        # one pair, not the figure
        ratio = statistics.median(p / d for p, d in zip(proxied, direct, strict=True))
        print(f"{'proxy / direct':<44}{ratio:>12.3f}")
        if writes["direct"]:
            w_direct, w_proxy = (statistics.median(writes[k]) for k in ("direct", "proxy"))
            print(f"{'pgbench -N tps, direct / through the ' + cluster.via:<44}{w_direct:>12,.0f}"
                  f" / {w_proxy:,.0f} = {w_proxy / w_direct:.3f}")
        print(f"{'failover window (kill -9 to first write)':<44}"
              f"{statistics.median(windows):>11.2f}s  rounds: "
              + ", ".join(f"{w:.2f}" for w in windows))
        print(json.dumps({"apps_failover_p50_s": round(statistics.median(windows), 2),
                          "proxy_ratio": round(ratio, 3),
                          "addon_create_s": round(statistics.median(creates), 2)}))
    finally:
        redisaddon.stop_all(home / "redis")
        cluster.destroy()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
