"""Balancer benchmark: wrk against the balancer and, in the same run, against nginx and
HAProxy in front of the same backend; a gunicorn-served sample app directly and through one
balancer process; and how soon a route change is visible after its event is appended.

    .venv/bin/python bench/balancer.py [--quick]

- Proxies: one fast backend (nginx answering a 12-byte body itself), and in front of it, each
  with one worker and keep-alive both ways: nginx, HAProxy, `tally serve balancer` (one
  process), `tally serve balancer --processes 2`. wrk, one thread, 32 kept-alive
  connections. Rounds rotate the order; each figure is the median of the rounds, each
  round's figures go to stderr. Configurations are generated in a temporary folder, on
  free ports.
- The app: tests/fixtures/apps/hello under gunicorn (2 workers x 4 threads, keep-alive),
  reached directly, through one balancer process and (for scale: any proxy on these cores
  costs the app CPU) through nginx: requests/s at peak (32 connections), and p99 at half of
  the direct peak (8 connections paced by a wrk script): the throughput lost and the p99
  added by the balancer.
- HTTPS: nginx and the balancer (`--tls-bind`) with the same certificate in front of the
  same backend: kept-alive requests/s, and new handshakes/s (a connection per request).
- Route update: a private ledger (primary + synchronous standby), two relays, the
  projectors, the API and a balancer reading the routes view through it (its token); an
  app's maintenance flag is toggled by appending MaintenanceChanged, and a client on a
  kept-alive connection asks until the answer flips: the time from the append to the first
  request that sees it, p50 and p99.

Ends with one JSON line: ratio_to_nginx, ratio_to_nginx_2proc, app_throughput_loss,
added_p99_ms, route_update_p99_ms, tls_ratio_to_nginx and the figures behind them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ledger import Ledger, NewEvent  # noqa: E402
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
frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  server s1 127.0.0.1:{backend}
""")
    return conf


_LAT = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def wrk(port: int, host: str, seconds: float, connections: int = 32,
        script: Path | None = None, scheme: str = "http",
        close: bool = False) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms); non-2xx answers or socket errors make it fail.
    `close`: a new connection (for https: a full handshake) per request."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-H",
            f"Host: {host}", f"{scheme}://127.0.0.1:{port}/"]
    if close:
        args += ["-H", "Connection: close"]
    if script is not None:
        args += ["-s", str(script)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60).stdout
    if "Non-2xx" in out or ("Socket errors" in out and not close):
        raise RuntimeError(f"wrk saw errors against port {port}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    lat = {q: float(v) * scale[u] for q, v, u in _LAT.findall(out)}
    return rps, lat["50"], lat["99"]


def rounds(cases: dict[str, Callable[[], tuple[float, float, float]]],
           n: int) -> dict[str, tuple[float, float, float]]:
    """Run every case once per round, rotating the order; medians per case."""
    names = list(cases)
    seen: dict[str, list[tuple[float, float, float]]] = {k: [] for k in names}
    for r in range(n):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            seen[name].append(cases[name]())
        log(f"round {r + 1}: " + "  ".join(
            f"{k} {seen[k][-1][0]:,.0f}/s p99 {seen[k][-1][2]:.2f}ms" for k in names))
    return {k: tuple(statistics.median(x[i] for x in v) for i in range(3))  # type: ignore
            for k, v in seen.items()}


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
                        proxy_set_header Connection ""; }} }}""")), "-p", str(tmp)],
                        tmp / "proxy.log"))
    procs.append(spawn(["haproxy", "-db", "-f", str(haproxy_conf(tmp, hap, backend))],
                       tmp / "haproxy.log"))
    routes = tmp / "routes.json"
    routes.write_text(json.dumps({"routes": [
        {"hostname": HOST, "app": "bench", "backends": [f"127.0.0.1:{backend}"]}]}))
    for port, extra in ((one, []), (two, ["--processes", "2"])):
        procs.append(spawn([PY, "-m", "tally.cli", "serve", "balancer", "--bind",
                            f"127.0.0.1:{port}", "--routes", str(routes), *extra],
                           tmp / f"balancer-{port}.log"))
    for port in (backend, ngx, hap, one, two):
        wait_port(port)
    for port in (ngx, hap, one, two):
        wrk(port, HOST, 1)  # warm up: connections pooled, code paths hot
    return rounds({
        "nginx": lambda: wrk(ngx, HOST, seconds),
        "haproxy": lambda: wrk(hap, HOST, seconds),
        "tally": lambda: wrk(one, HOST, seconds),
        "tally x2": lambda: wrk(two, HOST, seconds),
    }, n)


def app(tmp: Path, seconds: float, n: int, procs: list) -> tuple[dict, dict]:
    direct, through, ngx = free_ports(3)
    procs.append(spawn([str(Path(PY).parent / "gunicorn"), "--chdir",
                        str(ROOT / "tests" / "fixtures" / "apps" / "hello"), "-w", "2", "-k",
                        "gthread", "--threads", "4", "--keep-alive", "30", "-b",
                        f"127.0.0.1:{direct}", "app:app"], tmp / "gunicorn.log"))
    routes = tmp / "app-routes.json"
    routes.write_text(json.dumps({"routes": [
        {"hostname": APP_HOST, "app": "hello", "backends": [f"127.0.0.1:{direct}"]}]}))
    procs.append(spawn([PY, "-m", "tally.cli", "serve", "balancer", "--bind",
                        f"127.0.0.1:{through}", "--routes", str(routes)],
                       tmp / "app-balancer.log"))
    procs.append(spawn(["nginx", "-c", str(nginx_conf(tmp, "app-proxy", f"""
  upstream g {{ server 127.0.0.1:{direct}; keepalive 64; }}
  server {{ listen 127.0.0.1:{ngx};
           location / {{ proxy_pass http://g; proxy_http_version 1.1;
                        proxy_set_header Connection ""; proxy_set_header Host $host; }} }}""")),
                        "-p", str(tmp)], tmp / "app-proxy.log"))
    for port in (direct, through, ngx):
        wait_port(port)
        wrk(port, APP_HOST, 1)
    peak = rounds({"app direct": lambda: wrk(direct, APP_HOST, seconds),
                   "app via tally": lambda: wrk(through, APP_HOST, seconds),
                   "app via nginx": lambda: wrk(ngx, APP_HOST, seconds)}, n)
    half = peak["app direct"][0] / 2
    pace = tmp / "pace.lua"
    pace.write_text(f"function delay()\n  return {max(1, round(8 / half * 1000))}\nend\n")
    paced = rounds({
        "app direct, half load": lambda: wrk(direct, APP_HOST, seconds, 8, pace),
        "app via tally, half load": lambda: wrk(through, APP_HOST, seconds, 8, pace),
        "app via nginx, half load": lambda: wrk(ngx, APP_HOST, seconds, 8, pace),
    }, n)
    return peak, paced


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
                        proxy_set_header Connection ""; }} }}""")), "-p", str(tmp)],
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
    for port in (ngx, ours):
        wrk(port, HOST, 1, scheme="https")
    return rounds({
        "nginx https": lambda: wrk(ngx, HOST, seconds, scheme="https"),
        "tally https": lambda: wrk(ours, HOST, seconds, scheme="https"),
        "nginx handshakes": lambda: wrk(ngx, HOST, seconds, 8, scheme="https", close=True),
        "tally handshakes": lambda: wrk(ours, HOST, seconds, 8, scheme="https", close=True),
    }, n)


def route_updates(tmp: Path, samples: int, procs: list) -> list[float]:
    """Milliseconds from appending MaintenanceChanged to the first request that sees it."""
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
            out = []
            for i in range(samples):
                on = i % 2 == 0
                want = 503 if on else 200
                time.sleep(0.05)  # the relays' hot window passes sometimes: both paths count
                t0 = time.perf_counter()
                ledger.append("app-rte", [NewEvent("MaintenanceChanged",
                                                  {"app": "rte", "enabled": on})])
                while status() != want:
                    if time.perf_counter() - t0 > 10:
                        raise RuntimeError("a route change was not seen within 10 s")
                out.append((time.perf_counter() - t0) * 1000)
            conn.close()
            return out
    finally:
        api.kill()
        relays.stop()
        destroy_cluster(cluster)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="finish within 90 s")
    opts = parser.parse_args()
    seconds, n, samples = (2, 2, 60) if opts.quick else (5, 5, 400)
    if not shutil.which("wrk") or not shutil.which("nginx") or not shutil.which("haproxy"):
        sys.exit("needs wrk, nginx and haproxy (make install installs them)")
    tmp = Path(tempfile.mkdtemp(prefix="tally-bench-balancer-"))
    procs: list[subprocess.Popen] = []
    try:
        px = proxies(tmp, seconds, n, procs)
        peak, paced = app(tmp, seconds, n, procs)
        secure = tls(tmp, seconds, n, procs)
        updates = sorted(route_updates(tmp, samples, procs))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    nginx = px["nginx"][0]
    print(f"{'case':34} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'to nginx':>9}")
    for name, (rps, p50, p99) in px.items():
        print(f"{name + ' (1 worker)' if 'x2' not in name else name + ' (2 processes)':34} "
              f"{rps:9,.0f} {p50:7.2f} {p99:7.2f} {rps / nginx:9.2f}")
    for name, (rps, p50, p99) in {**peak, **paced}.items():
        print(f"{name:34} {rps:9,.0f} {p50:7.2f} {p99:7.2f}")
    for name, (rps, p50, p99) in secure.items():
        base = secure[name.replace("tally", "nginx")][0]
        print(f"{name + (' (per s)' if 'hand' in name else ''):34} {rps:9,.0f} {p50:7.2f} "
              f"{p99:7.2f} {rps / base:9.2f}")
    nginx_loss = 1 - peak["app via nginx"][0] / peak["app direct"][0]
    nginx_added = paced["app via nginx, half load"][2] - paced["app direct, half load"][2]
    loss = 1 - peak["app via tally"][0] / peak["app direct"][0]
    added = paced["app via tally, half load"][2] - paced["app direct, half load"][2]
    p50u = updates[len(updates) // 2]
    p99u = updates[min(len(updates) - 1, int(len(updates) * 0.99))]
    print(f"app throughput lost through the balancer: {loss:.1%}; p99 added at half load: "
          f"{added:.2f} ms (through nginx: {nginx_loss:.1%}, {nginx_added:.2f} ms)")
    print(f"route change visible after its append: p50 {p50u:.1f} ms, p99 {p99u:.1f} ms "
          f"({len(updates)} samples)")
    print(json.dumps({
        "ratio_to_nginx": round(px["tally"][0] / nginx, 3),
        "ratio_to_nginx_2proc": round(px["tally x2"][0] / nginx, 3),
        "app_throughput_loss": round(loss, 3),
        "added_p99_ms": round(added, 2),
        "route_update_p99_ms": round(p99u, 1),
        "route_update_p50_ms": round(p50u, 1),
        "tls_ratio_to_nginx": round(secure["tally https"][0] / secure["nginx https"][0], 3),
        "tls_handshake_ratio_to_nginx": round(
            secure["tally handshakes"][0] / secure["nginx handshakes"][0], 3),
        "app_throughput_loss_nginx": round(nginx_loss, 3),
        "added_p99_ms_nginx": round(nginx_added, 2),
        "tally_rps": round(px["tally"][0]), "tally_2proc_rps": round(px["tally x2"][0]),
        "nginx_rps": round(nginx), "haproxy_rps": round(px["haproxy"][0]),
        "ratio_haproxy_to_nginx": round(px["haproxy"][0] / nginx, 3),
        "tally_p99_ms": round(px["tally"][2], 2), "nginx_p99_ms": round(px["nginx"][2], 2),
    }))


if __name__ == "__main__":
    main()
