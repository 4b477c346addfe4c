"""Balancer benchmark: wrk against the balancer and, in the same run, against nginx and
HAProxy in front of the same backend; a gunicorn-served sample app directly and through one
balancer process; and how soon a route change is visible after its event is appended.

    .venv/bin/python bench/balancer.py [--quick]

- Proxies: one fast backend (nginx answering a 12-byte body itself), and in front of it, each
  with one worker and keep-alive both ways: nginx, HAProxy, `tally serve balancer` (one
  process), `tally serve balancer --processes 2`. wrk, one thread, 32 kept-alive
  connections. Rounds rotate the order; each figure is the median of the rounds, each
  round's figures go to stderr. nginx and HAProxy add the headers the balancer adds to
  every request (X-Forwarded-For/-Proto/-Host, Via), so each does the same work. Beside
  requests/s, each proxy's CPU time per request (from
  /proc): on a machine others load, the steadiest figure. Configurations are generated in
  a temporary folder, on free ports.
- The app: tests/fixtures/apps/hello under gunicorn (2 workers x 4 threads, keep-alive),
  reached directly, through one balancer process and through nginx (the same load, the
  same upstream): requests/s at peak (32 connections), and p99 at half of the direct peak
  (8 connections paced by a wrk script). The loss and the added p99 are taken within each
  round (the cases ran back to back) and their median kept. The headline figures
  (`app_throughput_loss`, `added_p99_ms`) model the production topology, where balancers
  run on hosts of their own, not on the app's cores: the app on core 0, the client and the
  proxy (or, for the direct case, the client alone) on core 1, in every case. A full run
  also measures everything on both shared cores (the `..._shared_cores` keys), where a
  CPU-bound app loses about what the proxy spends per request over what the app spends
  (nginx too: its figures are printed beside). With one core, or no taskset, only the
  shared-cores case runs and is the headline (`app_topology` says which).
- HTTPS: nginx and the balancer (`--tls-bind`) with the same certificate in front of the
  same backend: kept-alive requests/s, and new handshakes/s (a connection per request).
- Route update: a private ledger (primary + synchronous standby), two relays, the
  projectors, the API and a balancer reading the routes view through it (its token); an
  app's maintenance flag is toggled by appending MaintenanceChanged, and a client on a
  kept-alive connection asks every half millisecond until the answer flips: the time from
  the event's being appended (its commit returned to the writer) to the first request that
  sees it, p50 and p99 (and from the start of the append, which adds the writer's commit
  with its synchronous standby).

Ends with one JSON line: ratio_to_nginx, ratio_to_nginx_2proc, app_throughput_loss,
added_p99_ms, route_update_p99_ms, tls_ratio_to_nginx and the figures behind them, with the
load average while it ran and the largest share of a core the client used (far below 1: the
client is not what limits).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg2  # noqa: E402

from ledger import Ledger, NewEvent  # noqa: E402
from ledger.subscriber import Subscriber  # noqa: E402
from tests.conftest import (  # noqa: E402
    RelayProcs,
    destroy_cluster,
    free_ports,
    make_cluster,
    tally_env,
)
from tests.fixtures.apps.fleet import ApiProc  # noqa: E402

PY = sys.executable
HOST = "bench.localhost"
APP_HOST = "hello.localhost"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def wait_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port} after {timeout}s") from None
            time.sleep(0.05)


def spawn(args: list[str], logfile: Path, env: dict | None = None) -> subprocess.Popen:
    with open(logfile, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=out, env=env)


NGINX_FORWARDED = ("proxy_set_header Host $host; "
                   "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; "
                   "proxy_set_header X-Forwarded-Proto $scheme; "
                   "proxy_set_header X-Forwarded-Host $host; "
                   'proxy_set_header Via "1.1 nginx";')
"""What the balancer adds to every request (the issue asks it to), asked of nginx too: the
baselines do the same work on the same load in front of the same upstream."""


def nginx_conf(tmp: Path, name: str, body: str) -> Path:
    conf = tmp / f"{name}.conf"
    conf.write_text(f"""worker_processes 1;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 60s;
  {body}
}}
""")
    return conf


def haproxy_conf(tmp: Path, port: int, backend: int) -> Path:
    conf = tmp / "haproxy.cfg"
    conf.write_text(f"""global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
  option forwardfor
frontend f
  bind 127.0.0.1:{port}
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request add-header Via "1.1 haproxy"
  default_backend b
backend b
  server s1 127.0.0.1:{backend}
""")
    return conf


_LAT = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)


CLIENT_BUSY: list[float] = []
"""The share of a core wrk used in each run: far from 1, the client is not what limits."""
Figures = tuple[float, ...]
"""(requests/s, p50 ms, p99 ms[, CPU microseconds per request of the proxy])."""


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children alive now, from /proc."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                total += cpu_seconds(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def with_cpu(case: Callable[[], Figures], pid: int) -> Callable[[], Figures]:
    """The case's figures and the CPU time `pid` (a proxy) spent per request meanwhile: a
    figure the other sessions' load moves far less than requests/s."""
    def run() -> Figures:
        before = cpu_seconds(pid)
        started = time.monotonic()
        figures = case()
        used = cpu_seconds(pid) - before
        return (*figures, used / (figures[0] * (time.monotonic() - started)) * 1e6)
    return run


def wrk(port: int, host: str, seconds: float, connections: int = 32,
        script: Path | None = None, scheme: str = "http",
        close: bool = False, cpu: int | None = None) -> Figures:
    """(requests/s, p50 ms, p99 ms); non-2xx answers or socket errors make it fail.
    `close`: a new connection (for https: a full handshake) per request. `cpu`: run wrk
    on that core only."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-H",
            f"Host: {host}", f"{scheme}://127.0.0.1:{port}/"]
    if cpu is not None:
        args = ["taskset", "-c", str(cpu), *args]
    if close:
        args += ["-H", "Connection: close"]
    if script is not None:
        args += ["-s", str(script)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CLIENT_BUSY.append((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                       / seconds)
    if "Non-2xx" in out or ("Socket errors" in out and not close):
        raise RuntimeError(f"wrk saw errors against port {port}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    lat = {q: float(v) * scale[u] for q, v, u in _LAT.findall(out)}
    return rps, lat["50"], lat["99"]


def warm_up(ports: list[int], host: str, scheme: str = "http") -> None:
    """A second of load on each, all at once (before the measured rounds): connections
    pooled, code paths hot."""
    runs = [subprocess.Popen(["wrk", "-t1", "-c8", "-d1s", "-H", f"Host: {host}",
                              f"{scheme}://127.0.0.1:{port}/"], stdout=subprocess.DEVNULL)
            for port in ports]
    for run in runs:
        run.wait(60)


def rounds(cases: dict[str, Callable[[], Figures]], n: int,
           seen: dict[str, list[Figures]] | None = None) -> dict[str, Figures]:
    """Run every case once per round, rotating the order; medians per case (`seen` gets
    each round's figures, for ratios taken within a round)."""
    names = list(cases)
    seen = {} if seen is None else seen
    for name in names:
        seen[name] = []
    for r in range(n):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            seen[name].append(cases[name]())
        log(f"round {r + 1} (load {os.getloadavg()[0]:.1f}): " + "  ".join(
            f"{k} {seen[k][-1][0]:,.0f}/s p99 {seen[k][-1][2]:.2f}ms"
            + (f" {seen[k][-1][3]:.1f}us/req" if len(seen[k][-1]) > 3 else "")
            for k in names))
    return {k: tuple(statistics.median(x[i] for x in v) for i in range(len(v[0])))
            for k, v in seen.items()}


def paired(seen: dict[str, list[Figures]], ours: str, base: str,
           figure: Callable[[Figures, Figures], float]) -> float:
    """The median over rounds of `figure(ours, base)` taken within each round: the two
    ran back to back there, under the same outside load (which moves from round to round
    far more than one case differs from the other)."""
    return statistics.median(figure(a, b) for a, b in zip(seen[ours], seen[base], strict=True))


def proxies(tmp: Path, seconds: float, n: int, procs: list) -> dict:
    backend, ngx, hap, one, two = free_ports(5)
    procs.append(spawn(["nginx", "-c", str(nginx_conf(tmp, "backend", f"""
  server {{ listen 127.0.0.1:{backend};
           location / {{ default_type text/plain; return 200 "hello world\\n"; }} }}""")),
                        "-p", str(tmp)], tmp / "backend.log"))
    procs.append(spawn(["nginx", "-c", str(nginx_conf(tmp, "proxy", f"""
  upstream b {{ server 127.0.0.1:{backend}; keepalive 64; keepalive_requests 10000000; }}
  server {{ listen 127.0.0.1:{ngx};
           location / {{ proxy_pass http://b; proxy_http_version 1.1;
                        proxy_set_header Connection ""; {NGINX_FORWARDED} }} }}""")),
                        "-p", str(tmp)],
                        tmp / "proxy.log"))
    procs.append(spawn(["haproxy", "-db", "-f", str(haproxy_conf(tmp, hap, backend))],
                       tmp / "haproxy.log"))
    routes = tmp / "routes.json"
    routes.write_text(json.dumps({"routes": [
        {"hostname": HOST, "app": "bench", "backends": [f"127.0.0.1:{backend}"]}]}))
    nginx_proxy, haproxy = procs[-2], procs[-1]
    for port, extra in ((one, []), (two, ["--processes", "2"])):
        procs.append(spawn([PY, "-m", "tally.cli", "serve", "balancer", "--bind",
                            f"127.0.0.1:{port}", "--routes", str(routes), *extra],
                           tmp / f"balancer-{port}.log"))
    for port in (backend, ngx, hap, one, two):
        wait_port(port)
    warm_up([ngx, hap, one, two], HOST)
    return rounds({
        "nginx": with_cpu(lambda: wrk(ngx, HOST, seconds), nginx_proxy.pid),
        "haproxy": with_cpu(lambda: wrk(hap, HOST, seconds), haproxy.pid),
        "tally": with_cpu(lambda: wrk(one, HOST, seconds), procs[-2].pid),
        "tally x2": with_cpu(lambda: wrk(two, HOST, seconds), procs[-1].pid),
    }, n)


def app(tmp: Path, seconds: float, n: int, procs: list, pinned: bool) -> dict[str, float]:
    """The sample app reached directly, through one balancer process and through nginx:
    throughput at peak (32 connections) and p99 at half the direct peak (8 connections
    paced by a wrk script), each loss and added p99 taken within a round (`paired`).

    `pinned`: the app on core 0, the client and the proxies on core 1, in every case: as in
    production, where balancers do not run on the app's cores, the app has the same CPU
    whatever stands in front of it, and the loss is what the proxy does to its requests.
    Unpinned, every process shares both cores: a CPU-bound app then loses about the
    proxy's CPU per request over its own (any proxy's; nginx's is printed beside)."""
    tag = "pinned" if pinned else "shared"
    app_cpu, side = (["taskset", "-c", "0"], ["taskset", "-c", "1"]) if pinned else ([], [])
    client = 1 if pinned else None
    direct, through, ngx = free_ports(3)
    procs.append(spawn([*app_cpu, str(Path(PY).parent / "gunicorn"), "--chdir",
                        str(ROOT / "tests" / "fixtures" / "apps" / "hello"), "-w", "2", "-k",
                        "gthread", "--threads", "4", "--keep-alive", "30", "-b",
                        f"127.0.0.1:{direct}", "app:app"], tmp / f"gunicorn-{tag}.log"))
    routes = tmp / f"app-routes-{tag}.json"
    routes.write_text(json.dumps({"routes": [
        {"hostname": APP_HOST, "app": "hello", "backends": [f"127.0.0.1:{direct}"]}]}))
    procs.append(spawn([*side, PY, "-m", "tally.cli", "serve", "balancer", "--bind",
                        f"127.0.0.1:{through}", "--routes", str(routes)],
                       tmp / f"app-balancer-{tag}.log"))
    ours = procs[-1].pid
    procs.append(spawn([*side, "nginx", "-c", str(nginx_conf(tmp, f"app-proxy-{tag}", f"""
  upstream g {{ server 127.0.0.1:{direct}; keepalive 64; }}
  server {{ listen 127.0.0.1:{ngx};
           location / {{ proxy_pass http://g; proxy_http_version 1.1;
                        proxy_set_header Connection ""; {NGINX_FORWARDED} }} }}""")),
                        "-p", str(tmp)], tmp / f"app-proxy-{tag}.log"))
    theirs = procs[-1].pid
    for port in (direct, through, ngx):
        wait_port(port)
    warm_up([direct, through, ngx], APP_HOST)
    peak_seen: dict[str, list[Figures]] = {}
    paced_seen: dict[str, list[Figures]] = {}
    peak = rounds({
        f"app direct ({tag})": lambda: wrk(direct, APP_HOST, seconds, cpu=client),
        f"app via tally ({tag})": with_cpu(
            lambda: wrk(through, APP_HOST, seconds, cpu=client), ours),
        f"app via nginx ({tag})": with_cpu(
            lambda: wrk(ngx, APP_HOST, seconds, cpu=client), theirs)}, n, peak_seen)
    half = peak[f"app direct ({tag})"][0] / 2
    pace = tmp / f"pace-{tag}.lua"
    pace.write_text(f"function delay()\n  return {max(1, round(8 / half * 1000))}\nend\n")
    paced = rounds({
        f"app direct, half load ({tag})": lambda: wrk(direct, APP_HOST, seconds, 8, pace,
                                                      cpu=client),
        f"app via tally, half load ({tag})": lambda: wrk(through, APP_HOST, seconds, 8,
                                                         pace, cpu=client),
        f"app via nginx, half load ({tag})": lambda: wrk(ngx, APP_HOST, seconds, 8, pace,
                                                         cpu=client),
    }, n, paced_seen)
    for figures in (peak, paced):
        for name, (rps, p50, p99, *cpu) in figures.items():
            print(f"{name:44} {rps:9,.0f} {p50:7.2f} {p99:7.2f}"
                  + (f" {cpu[0]:9.1f}" if cpu else ""))
    out = {}
    for proxy in ("tally", "nginx"):
        out[f"loss {proxy}"] = paired(peak_seen, f"app via {proxy} ({tag})",
                                      f"app direct ({tag})", lambda a, b: 1 - a[0] / b[0])
        out[f"added {proxy}"] = paired(paced_seen, f"app via {proxy}, half load ({tag})",
                                       f"app direct, half load ({tag})",
                                       lambda a, b: a[2] - b[2])
        out[f"cpu {proxy}"] = peak[f"app via {proxy} ({tag})"][3]
    # Beside the loss against the direct case: the app's throughput through the balancer
    # against through nginx, the two proxied cases alike in every respect but the proxy.
    out["to nginx"] = paired(peak_seen, f"app via tally ({tag})", f"app via nginx ({tag})",
                             lambda a, b: a[0] / b[0])
    return out


def tls(tmp: Path, seconds: float, n: int, procs: list) -> dict:
    """Kept-alive HTTPS requests/s and new handshakes/s (a connection per request), nginx
    and the balancer with the same certificate, in front of the same backend."""
    certs = tmp / "certs"
    certs.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    f"/CN={HOST}", "-keyout", str(certs / "default.key"), "-out",
                    str(certs / "default.crt")], check=True, capture_output=True)
    backend, ngx, ours = free_ports(3)
    procs.append(spawn(["nginx", "-c", str(nginx_conf(tmp, "tls-backend", f"""
  server {{ listen 127.0.0.1:{backend};
           location / {{ default_type text/plain; return 200 "hello world\\n"; }} }}""")),
                        "-p", str(tmp)], tmp / "tls-backend.log"))
    procs.append(spawn(["nginx", "-c", str(nginx_conf(tmp, "tls-proxy", f"""
  upstream b {{ server 127.0.0.1:{backend}; keepalive 64; keepalive_requests 10000000; }}
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:SSL:1m;
  server {{ listen 127.0.0.1:{ngx} ssl;
           ssl_certificate {certs}/default.crt; ssl_certificate_key {certs}/default.key;
           location / {{ proxy_pass http://b; proxy_http_version 1.1;
                        proxy_set_header Connection ""; {NGINX_FORWARDED} }} }}""")),
                        "-p", str(tmp)],
                       tmp / "tls-proxy.log"))
    routes = tmp / "tls-routes.json"
    routes.write_text(json.dumps({"routes": [
        {"hostname": HOST, "app": "bench", "backends": [f"127.0.0.1:{backend}"]}]}))
    plain = free_ports(1)[0]
    procs.append(spawn([PY, "-m", "tally.cli", "serve", "balancer", "--bind",
                        f"127.0.0.1:{plain}", "--routes", str(routes), "--tls-bind",
                        f"127.0.0.1:{ours}", "--certs", str(certs)], tmp / "tls-balancer.log"))
    for port in (backend, ngx, ours):
        wait_port(port)
    warm_up([ngx, ours], HOST, "https")
    return rounds({
        "nginx https": lambda: wrk(ngx, HOST, seconds, scheme="https"),
        "tally https": lambda: wrk(ours, HOST, seconds, scheme="https"),
        "nginx handshakes": lambda: wrk(ngx, HOST, seconds, 8, scheme="https", close=True),
        "tally handshakes": lambda: wrk(ours, HOST, seconds, 8, scheme="https", close=True),
    }, n)


class Hops:
    """When each hop of a route change happened, watched from outside the daemons: a
    subscriber of the relays (the relay published a new head) and a poll of the routes
    view every millisecond (the routes projector committed a new routes_version)."""

    def __init__(self, endpoints: list[str], dsn: str) -> None:
        self.published: list[float] = []
        self.projected: list[float] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._relays, args=(endpoints,), daemon=True),
                        threading.Thread(target=self._view, args=(dsn,), daemon=True)]
        for t in self.threads:
            t.start()

    def _relays(self, endpoints: list[str]) -> None:
        sub = Subscriber(endpoints)
        try:
            while not self.stop.is_set():
                if sub.wait(0.2) is not None:
                    self.published.append(time.perf_counter())
        finally:
            sub.close()

    def _view(self, dsn: str) -> None:
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        last = None
        try:
            with conn.cursor() as cur:
                while not self.stop.is_set():
                    cur.execute("SELECT version FROM views.routes_version WHERE id = 1")
                    row = cur.fetchone()
                    if row != last:
                        self.projected.append(time.perf_counter())
                        last = row
                    time.sleep(0.001)
        finally:
            conn.close()

    @staticmethod
    def first(times: list[float], after: float) -> float | None:
        return next((t for t in times if t > after), None)


PROBE_EVERY = 0.0005
"""How often the route-change probe asks while it waits for the change: often enough to
add at most half a millisecond to a figure, seldom enough that the probe and the balancer
answering it do not take a core from the chain being measured (asking in a loop did)."""


def route_updates(tmp: Path, samples: int, procs: list) -> list[tuple[float, ...]]:
    """Per change, milliseconds from starting to append MaintenanceChanged to: the append's
    commit, the relays' wake-up, the routes projector's commit, and the first request that
    sees it. The route change's figure is the last minus the first: from the event's being
    appended (its commit returned) to the first request that sees it."""
    backend, port = free_ports(2)
    procs.append(spawn(["nginx", "-c", str(nginx_conf(tmp, "rt-backend", f"""
  server {{ listen 127.0.0.1:{backend}; location / {{ return 200 "ok\\n"; }} }}""")),
                        "-p", str(tmp)], tmp / "rt-backend.log"))
    cluster = make_cluster()
    relays = RelayProcs(cluster)
    api = ApiProc(cluster, "bench-api")
    try:
        relays.start(0)
        relays.start(1)
        env = tally_env(cluster, TALLY_RELAYS=",".join(relays.endpoints))
        procs.append(spawn([PY, "-m", "tally.cli", "serve", "projectors"],
                           tmp / "projectors.log", env))
        api.start()
        procs.append(spawn([PY, "-m", "tally.cli", "serve", "balancer", "--bind",
                            f"127.0.0.1:{port}", "--balancer-id", "rt"], tmp / "rt-balancer.log",
                           {**env, "TALLY_BALANCER_API": api.url,
                            "TALLY_BALANCER_TOKEN": api.token("rt", "balancer")}))
        host = "rte.tally.local"
        with Ledger(cluster.dsn()) as ledger:
            ledger.append("app-rte", [
                NewEvent("AppCreated", {"name": "rte", "owner": "bench"}),
                NewEvent("ReleaseCreated", {"app": "rte", "release": 1,
                                            "bundle_digest": "0" * 64,
                                            "procfile": {"web": "true"},
                                            "config_version": 0})])
            ledger.append("host-b1", [NewEvent("HostRegistered", {
                "host_id": "b1", "address": "127.0.0.1", "port_min": backend,
                "port_max": backend, "capacity": 1})])
            ledger.append("placement-rte1", [
                NewEvent("InstancePlaced", {"instance_id": "rte1", "app": "rte", "release": 1,
                                            "process_type": "web", "host_id": "b1",
                                            "port": backend})])
            ledger.append("instance-rte1", [
                NewEvent("InstanceHealthy", {"instance_id": "rte1", "host_id": "b1"})])
            wait_port(port)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

            def status() -> int:
                conn.request("GET", "/", headers={"Host": host})
                reply = conn.getresponse()
                reply.read()
                return reply.status

            deadline = time.monotonic() + 60
            while status() != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the balancer never routed the app")
                time.sleep(0.05)
            hops = Hops(relays.endpoints, cluster.dsn())
            out = []
            for i in range(samples):
                on = i % 2 == 0
                want = 503 if on else 200
                time.sleep(0.05)  # the relays' hot window passes sometimes: both paths count
                t0 = time.perf_counter()
                ledger.append("app-rte", [NewEvent("MaintenanceChanged",
                                                  {"app": "rte", "enabled": on})])
                t1 = time.perf_counter()
                while status() != want:
                    if time.perf_counter() - t0 > 10:
                        raise RuntimeError("a route change was not seen within 10 s")
                    time.sleep(PROBE_EVERY)
                t4 = time.perf_counter()
                time.sleep(0.005)  # the watchers' last look
                t2 = Hops.first(hops.published, t1) or t4
                t3 = Hops.first(hops.projected, t0) or t4
                out.append(tuple((t - t0) * 1000 for t in (t1, min(t2, t3), t3, t4)))
            hops.stop.set()
            conn.close()
            return out
    finally:
        api.kill()
        relays.stop()
        destroy_cluster(cluster)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="finish within 90 s")
    parser.add_argument("--only", choices=("proxies", "app", "tls", "routes"),
                        help="run one part (no JSON line): to work on it")
    opts = parser.parse_args()
    seconds, n, samples = (1, 3, 60) if opts.quick else (5, 5, 400)
    if not shutil.which("wrk") or not shutil.which("nginx") or not shutil.which("haproxy"):
        sys.exit("needs wrk, nginx and haproxy (make install installs them)")
    pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    tmp = Path(tempfile.mkdtemp(prefix="tally-bench-balancer-"))
    procs: list[subprocess.Popen] = []
    load = [os.getloadavg()[0]]
    print(f"{'case':44} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'us/req':>9} {'to nginx':>9}")
    px = shared = pinned = secure = hops = None

    def part(name: str) -> bool:
        return opts.only in (None, name)

    try:
        if part("proxies"):
            px = proxies(tmp, seconds, n, procs)
            nginx = px["nginx"][0]
            for name, (rps, p50, p99, cpu) in px.items():
                print(f"{name + (' (2 processes)' if 'x2' in name else ' (1 worker)'):44} "
                      f"{rps:9,.0f} {p50:7.2f} {p99:7.2f} {cpu:9.1f} {rps / nginx:9.2f}")
            load.append(os.getloadavg()[0])
        if part("app"):
            # The headline is the production topology (the app on a core of its own);
            # full runs also measure everything on shared cores (--quick has no time).
            pinned = app(tmp, seconds, n, procs, pinned=True) if pin else None
            if not opts.quick or pinned is None:
                shared = app(tmp, seconds, n, procs, pinned=False)
            load.append(os.getloadavg()[0])
        if part("tls"):
            secure = tls(tmp, seconds, n if not opts.quick else 2, procs)
            for name, (rps, p50, p99) in secure.items():
                base = secure[name.replace("tally", "nginx")][0]
                print(f"{name + (' (per s)' if 'hand' in name else ''):44} {rps:9,.0f} "
                      f"{p50:7.2f} {p99:7.2f} {'':9} {rps / base:9.2f}")
        if part("routes"):
            hops = route_updates(tmp, samples, procs)
            load.append(os.getloadavg()[0])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    for tag, figures in (("all on shared cores", shared), ("app on its own core", pinned)):
        if figures is not None:
            print(f"{tag}: throughput lost through the balancer {figures['loss tally']:.1%}"
                  f" (nginx {figures['loss nginx']:.1%}), p99 added at half load "
                  f"{figures['added tally']:.2f} ms (nginx {figures['added nginx']:.2f} ms);"
                  f" CPU per request: balancer {figures['cpu tally']:.1f} us, nginx "
                  f"{figures['cpu nginx']:.1f} us; the app through the balancer at "
                  f"{figures['to nginx']:.2f} of its throughput through nginx")

    def quantiles(values: list[float]) -> tuple[float, float]:
        ordered = sorted(values)
        return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1,
                                                       int(len(ordered) * 0.99))]

    if hops is not None:
        log("slowest route changes, ms after the append's start (committed, relay, projected, "
            "seen): " + "; ".join(" / ".join(f"{t:.1f}" for t in h)
                                  for h in sorted(hops, key=lambda h: h[0] - h[3])[:5]))
        p50u, p99u = quantiles([h[3] - h[0] for h in hops])
        p50s, p99s = quantiles([h[3] for h in hops])
        print(f"route change visible after its event was appended (commit returned): p50 "
              f"{p50u:.1f} ms, p99 {p99u:.1f} ms ({len(hops)} samples; from the start of the "
              f"append: p50 {p50s:.1f}, p99 {p99s:.1f}); hop by hop, p50 / p99 ms: " + "; ".join(
                  f"{name} {a:.1f} / {b:.1f}" for name, (a, b) in (
                      ("append committed", quantiles([h[0] for h in hops])),
                      ("relay woke subscribers", quantiles([h[1] - h[0] for h in hops])),
                      ("routes projected", quantiles([h[2] - h[1] for h in hops])),
                      ("balancer answered with it", quantiles([h[3] - h[2] for h in hops])))))
    if CLIENT_BUSY:
        print(f"load average during the run: {', '.join(f'{x:.1f}' for x in load)}; the "
              f"client (wrk, one thread) used at most {max(CLIENT_BUSY):.0%} of a core")
    if opts.only is not None:
        return
    assert px is not None and secure is not None and hops is not None
    headline = pinned if pinned is not None else shared
    assert headline is not None
    nginx = px["nginx"][0]
    print(json.dumps({
        "ratio_to_nginx": round(px["tally"][0] / nginx, 3),
        "ratio_to_nginx_2proc": round(px["tally x2"][0] / nginx, 3),
        "app_throughput_loss": round(headline["loss tally"], 3),
        "added_p99_ms": round(headline["added tally"], 2),
        "app_topology": "app on its own core" if pinned is not None else "all on shared cores",
        "route_update_p99_ms": round(p99u, 1),
        "route_update_p50_ms": round(p50u, 1),
        "route_update_from_append_start_p99_ms": round(p99s, 1),
        "route_update_hops_p50_ms": {
            name: round(quantiles(values)[0], 1) for name, values in (
                ("append", [h[0] for h in hops]),
                ("relay", [h[1] - h[0] for h in hops]),
                ("projector", [h[2] - h[1] for h in hops]),
                ("balancer", [h[3] - h[2] for h in hops]))},
        "app_throughput_loss_nginx": round(headline["loss nginx"], 3),
        "added_p99_ms_nginx": round(headline["added nginx"], 2),
        "app_throughput_ratio_to_nginx": round(headline["to nginx"], 3),
        "app_cpu_us_per_request": round(headline["cpu tally"], 1),
        "app_cpu_us_per_request_nginx": round(headline["cpu nginx"], 1),
        **({"app_throughput_loss_shared_cores": round(shared["loss tally"], 3),
            "app_throughput_loss_shared_cores_nginx": round(shared["loss nginx"], 3),
            "added_p99_ms_shared_cores": round(shared["added tally"], 2),
            "added_p99_ms_shared_cores_nginx": round(shared["added nginx"], 2),
            "app_throughput_ratio_to_nginx_shared_cores": round(shared["to nginx"], 3)}
           if shared is not None and pinned is not None else {}),
        "tls_ratio_to_nginx": round(secure["tally https"][0] / secure["nginx https"][0], 3),
        "tls_handshake_ratio_to_nginx": round(
            secure["tally handshakes"][0] / secure["nginx handshakes"][0], 3),
        "tally_rps": round(px["tally"][0]), "tally_2proc_rps": round(px["tally x2"][0]),
        "nginx_rps": round(nginx), "haproxy_rps": round(px["haproxy"][0]),
        "ratio_haproxy_to_nginx": round(px["haproxy"][0] / nginx, 3),
        "tally_p99_ms": round(px["tally"][2], 2), "nginx_p99_ms": round(px["nginx"][2], 2),
        "tally_cpu_us_per_request": round(px["tally"][3], 1),
        "nginx_cpu_us_per_request": round(px["nginx"][3], 1),
        "haproxy_cpu_us_per_request": round(px["haproxy"][3], 1),
        "load_average": [round(x, 1) for x in load],
        "client_max_core_share": round(max(CLIENT_BUSY), 2),
    }))


if __name__ == "__main__":
    main()
