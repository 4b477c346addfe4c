"""API benchmark: requests/s and p99 of `GET /apps/NAME` and `POST /apps/NAME/scale` under
gunicorn with 8 concurrent clients, beside a bare Flask route returning a constant under
the same gunicorn configuration (the framework ceiling), measured in the same run.

    .venv/bin/python bench/api.py [--quick]

A private ledger cluster (primary + synchronous standby); the API as `tally serve api`;
clients are separate processes with keep-alive connections. Cases alternate with the
baseline (measured just before and just after each case: the ratio is to their mean) and
each figure is the median of the rounds. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.auth import create_user  # noqa: E402
from api.serve import Gunicorn, options  # noqa: E402
from ledger import Ledger  # noqa: E402
from tests.api_process import ApiProcess, pack_files  # noqa: E402
from tests.conftest import destroy_cluster, free_ports, make_cluster, tally_env  # noqa: E402

CLIENTS = 8
BUNDLE = {"Procfile": "web: gunicorn app:app\n", "requirements.txt": "flask\n"}


def serve_baseline(port: int, workers: int, threads: int) -> None:
    """The ceiling: Flask returning a constant JSON, under the API's gunicorn options."""
    from flask import Flask

    app = Flask("baseline")
    app.add_url_rule("/const", "const", lambda: {"ok": True})
    Gunicorn(app, options(f"127.0.0.1:{port}", workers, threads)).run()


def client(args: tuple[int, str, str, bytes | None, str, float, float]) -> list[float]:
    """One client: as many requests as it can between start and end; their latencies (s)."""
    port, method, path, body, token, start, end = args
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    latencies: list[float] = []
    while time.time() < start:
        time.sleep(0.001)
    while (t0 := time.perf_counter()) and time.time() < end:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}")
        latencies.append(time.perf_counter() - t0)
    conn.close()
    return latencies


def measure(pool: Any, port: int, method: str, paths: list[str], token: str,
            body: Any, seconds: float) -> tuple[float, float]:
    """(requests/s, p99 ms) with CLIENTS concurrent clients."""
    start = time.time() + 0.5
    data = json.dumps(body).encode() if body is not None else None
    jobs = [(port, method, paths[i % len(paths)], data, token, start, start + seconds)
            for i in range(CLIENTS)]
    latencies = [x for part in pool.map(client, jobs) for x in part]
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan")
    return len(latencies) / seconds, p99


def wait_http(port: int, path: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answers on port {port}")


def setup(url: str, token: str, apps: list[str]) -> None:
    import requests

    auth = {"Authorization": f"Bearer {token}"}
    for name in apps:
        requests.post(f"{url}/apps", json={"name": name}, headers=auth).raise_for_status()
        requests.post(f"{url}/apps/{name}/releases", data=pack_files(BUNDLE),
                      headers={**auth, "Content-Type": "application/gzip"}).raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Finish within 60 s.")
    defaults = options("x")
    parser.add_argument("--workers", type=int, default=defaults["workers"])
    parser.add_argument("--threads", type=int, default=defaults["threads"])
    args = parser.parse_args()
    shape = (str(args.workers), str(args.threads))
    seconds, rounds = (3.0, 1) if args.quick else (8.0, 3)
    cluster = make_cluster()
    api_port, base_port = free_ports(2)
    baseline = subprocess.Popen([sys.executable, __file__, "--serve-baseline", str(base_port),
                                 *shape], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = ApiProcess(tally_env(cluster), api_port, ("--workers", shape[0], "--threads", shape[1]))
    try:
        api.wait_ready()
        wait_http(base_port, "/const")
        with Ledger(cluster.dsn()) as ledger:
            token = create_user(ledger, "bench", "admin")
        apps = [f"bench-{i}" for i in range(CLIENTS)]
        setup(api.url, token, apps)
        cases = {
            "GET /apps/NAME": ("GET", [f"/apps/{a}" for a in apps], None),
            "POST /apps/NAME/scale": ("POST", [f"/apps/{a}/scale" for a in apps],
                                      {"scale": {"web": 2}}),
        }
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in [*cases, "ceiling"]}
        ratios: dict[str, list[float]] = {k: [] for k in cases}
        with mp.get_context("spawn").Pool(CLIENTS) as pool:
            measure(pool, base_port, "GET", ["/const"], token, None, 1.0)  # warm up
            ceiling = lambda: measure(pool, base_port, "GET", ["/const"], token,  # noqa: E731
                                      None, seconds)
            for _ in range(rounds):
                for name, (method, paths, body) in cases.items():
                    # the ceiling just before and just after: the machine may be shared
                    before = ceiling()
                    ours = measure(pool, api_port, method, paths, token, body, seconds)
                    after = ceiling()
                    results[name].append(ours)
                    results["ceiling"] += [before, after]
                    ratios[name].append(ours[0] / ((before[0] + after[0]) / 2))
    finally:
        api.stop()
        baseline.terminate()
        baseline.wait()
        destroy_cluster(cluster)
    med = {k: (statistics.median(r for r, _ in v), statistics.median(p for _, p in v))
           for k, v in results.items()}
    ratio = {k: statistics.median(v) for k, v in ratios.items()}
    ratio["ceiling"] = 1.0
    print(f"gunicorn: {args.workers} workers x {args.threads} threads "
          f"(gthread), {CLIENTS} concurrent keep-alive clients, {rounds} round(s) of "
          f"{seconds:.0f}s")
    print(f"{'case':<26}{'requests/s':>12}{'p99 ms':>9}{'of ceiling':>12}")
    for name, (rate, p99) in med.items():
        print(f"{name:<26}{rate:>12,.0f}{p99:>9.1f}{ratio[name]:>12.2f}")
    print(json.dumps({
        "read_ratio": round(ratio["GET /apps/NAME"], 3),
        "write_ratio": round(ratio["POST /apps/NAME/scale"], 3),
        "read_rps": round(med["GET /apps/NAME"][0]), "write_rps":
        round(med["POST /apps/NAME/scale"][0]), "ceiling_rps": round(med["ceiling"][0]),
        "read_p99_ms": round(med["GET /apps/NAME"][1], 2),
        "write_p99_ms": round(med["POST /apps/NAME/scale"][1], 2),
        "ceiling_p99_ms": round(med["ceiling"][1], 2),
    }))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-baseline":
        serve_baseline(*(int(a) for a in sys.argv[2:]))
    else:
        main()
