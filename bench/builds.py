"""Builds benchmark: what building in the sandbox costs, redeploy to first 200, scale-out.

    .venv/bin/python bench/builds.py [--quick]

- build: the sample Flask + gunicorn app built as the builder builds it (bubblewrap, the
  build user, cgroups; agents/builder.py: sandboxed_build) with an empty build cache
  (cold) and again with the cache the first build left (warm: requirements unchanged).
  Baseline, in the same run: `python -m venv && pip install -r requirements.txt` of the
  same app by hand (pip's own cache warm, as on a developer's machine). Ratio: warm build
  / plain pip.
- redeploy: a private platform (ledger, relays, placer, builder, one host agent); the app
  deployed once, then its code changed (requirements not) and released again: seconds from
  the ReleaseCreated append (what `tally deploy` does once the bundle is stored) to the
  first 200 from the new release (its build included).
- scale-out: web 1 -> 10 instances, to all ten healthy.
- start cost of the writable /app: a start with a fresh overlay beside a plain start in
  the slug's folder and beside copying the slug (copy-on-start).

Ends with one JSON line: build_ratio_cached, redeploy_to_200_s, scale_out_10_s (+ context).
Targets: cached build <= 1.3x plain pip, redeploy <= 5 s, scale-out <= 5 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents import runtime, sandbox, slug  # noqa: E402
from agents.builder import Settings, sandboxed_build  # noqa: E402
from agents.fleet import Fleet  # noqa: E402
from bench.rollout import fleet_now, time_to_serve  # noqa: E402
from ledger import Ledger, NewEvent  # noqa: E402
from tests.conftest import RelayProcs, destroy_cluster, free_ports, make_cluster  # noqa: E402
from tests.fixtures.apps import APPS, procfile, slug_for, store, tarball  # noqa: E402
from tests.fixtures.apps.fleet import AgentProc, builder, create_app, placer, scale  # noqa: E402
from tests.waiting import wait_until  # noqa: E402


def bundle(marker: str) -> bytes:
    """The sample app with `marker` in a comment of app.py: new code, same requirements."""
    entries = []
    for path in sorted((APPS / "hello").iterdir()):
        data = path.read_bytes() + (f"\n# {marker}\n".encode() if path.name == "app.py" else b"")
        info = tarfile.TarInfo(path.name)
        info.size, info.mode = len(data), 0o644
        entries.append((info, data))
    return tarball(entries)


BENCH_BUILD_UID = 399_991
"""The benchmark's builds run as this uid (the build range's, no app's)."""


def build_once(work: Path, cache: Path, data: bytes) -> float:
    store(data, work)
    digest = hashlib.sha256(data).hexdigest()
    folder = work / f"b-{time.monotonic_ns()}"
    lines: list[str] = []
    t0 = time.monotonic()
    result = sandboxed_build(work / f"{digest}.tar.gz", digest, folder, cache, {},
                             work / "buildpack.py", sandbox.index_paths(dict(os.environ)),
                             sandbox.build_user(BENCH_BUILD_UID),
                             Settings(work), lines.append)
    took = time.monotonic() - t0
    shutil.rmtree(folder, ignore_errors=True)
    assert result.code == 0, "\n".join(lines[-20:])
    return took


def plain_pip(scratch: Path) -> float:
    venv = scratch / f"venv-{time.monotonic_ns()}"
    t0 = time.monotonic()
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r",
                    str(APPS / "hello" / "requirements.txt")], check=True)
    took = time.monotonic() - t0
    shutil.rmtree(venv, ignore_errors=True)
    return took


def build_bench(rounds: int) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="tally-bench-build-", dir="/var/tmp"))
    work.chmod(0o711)
    shutil.copyfile(Path(sandbox.__file__).with_name("buildpack.py"), work / "buildpack.py")
    (work / "buildpack.py").chmod(0o644)
    try:
        cache = work / "cache"
        cache.mkdir()
        cold = build_once(work, cache, bundle("cold"))
        warm, plain = [], []
        for i in range(rounds):  # alternating, so both see the same machine
            warm.append(build_once(work, cache, bundle(f"warm {i}")))
            plain.append(plain_pip(work))
        return {"build_cold_s": round(cold, 2), "build_warm_s": round(statistics.median(warm), 2),
                "plain_pip_s": round(statistics.median(plain), 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def start_cost(rounds: int) -> dict[str, float]:
    """What the writable /app costs at each start: a process started in the slug's folder
    as is, beside one started in a fresh overlay at /app (agents/runtime.py), beside
    copying the slug instead (what copy-on-start would cost). Medians, in ms."""
    work = Path(tempfile.mkdtemp(prefix="tally-bench-start-", dir="/var/tmp"))
    try:
        digest, _ = slug_for(bundle_of_hello(), work)
        lower = slug.unpack(work / f"{digest}.tar.gz", digest, work / "releases", None)
        plain, overlay, copy = [], [], []
        for i in range(rounds):
            t0 = time.perf_counter()
            subprocess.run(["/bin/bash", "-c", "test -f app.py"], cwd=lower, check=True)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            layer = runtime.fresh_layer(work / f"i{i}", os.getuid(), os.getgid(), 256)
            subprocess.run(["/bin/bash", "-c", "test -f /app/app.py"], cwd=layer.upper,
                           check=True, preexec_fn=runtime.child_setup(lower, layer, None))
            overlay.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            shutil.copytree(lower, work / f"c{i}", symlinks=True)
            copy.append(time.perf_counter() - t0)
        return {"start_plain_ms": round(statistics.median(plain) * 1000, 1),
                "start_overlay_ms": round(statistics.median(overlay) * 1000, 1),
                "start_copy_ms": round(statistics.median(copy) * 1000, 1)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bundle_of_hello() -> bytes:
    from tests.fixtures.apps import app_tarball

    return app_tarball("hello")


def platform_bench(redeploys: int) -> dict[str, float]:
    cluster = make_cluster()
    relays = RelayProcs(cluster)
    daemons = []
    try:
        relays.start(0)
        relays.start(1)
        low = free_ports(1)[0]
        agent = AgentProc(cluster, "h1", (low, low + 29), relays.endpoints)
        daemons = [agent, placer(cluster, relays.endpoints), builder(cluster)]
        for d in daemons:
            d.start()
        home = cluster.root.parent
        with Ledger(cluster.dsn()) as led:
            def fleet() -> Fleet:
                return fleet_now(led)

            def deploy(n: int) -> float:
                data = bundle(f"release {n}")
                digest = store(data, home / "bundles")
                t0 = time.monotonic()
                led.append("app-bench", [NewEvent("ReleaseCreated", {
                    "app": "bench", "release": n, "bundle_digest": digest,
                    "procfile": procfile("hello"), "config_version": 0})])
                return time_to_serve(led, "bench", n, t0, placed_within=300)

            last = int(os.environ["TALLY_APP_UIDS"].split("-")[1])  # tests/conftest.py's
            create_app(led, "bench", uid=last)  # a uid: the builder builds as its build uid
            scale(led, "bench", web=1)
            first = deploy(1)  # cold: the app's build cache is empty
            times = [deploy(n) for n in range(2, 2 + redeploys)]
            t0 = time.monotonic()
            scale(led, "bench", web=10)

            def all_healthy() -> bool:
                f = fleet()
                ps = f.placements_of("bench")
                return len(ps) == 10 and all(f.instance(p.instance_id).state == "healthy"
                                             for p in ps)

            wait_until(all_healthy, 120, "10 healthy instances")
            scale_out = time.monotonic() - t0
        return {"first_deploy_s": round(first, 2),
                "redeploy_to_200_s": round(statistics.median(times), 2),
                "scale_out_10_s": round(scale_out, 2)}
    finally:
        for d in daemons:
            d.kill()
        for d in daemons:
            if isinstance(d, AgentProc):
                d.kill_apps()
        relays.stop()
        destroy_cluster(cluster)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 1 redeploy (< 120 s)")
    args = parser.parse_args()
    rounds, redeploys = (1, 1) if args.quick else (3, 3)
    figures = build_bench(rounds)
    ratio = figures["build_warm_s"] / figures["plain_pip_s"]
    figures.update(start_cost(10 if args.quick else 30))
    figures.update(platform_bench(redeploys))
    print(f"{'case':<44}{'seconds':>9}")
    print(f"{'build, empty cache (sandboxed)':<44}{figures['build_cold_s']:>9.2f}")
    print(f"{'build, warm cache, requirements unchanged':<44}{figures['build_warm_s']:>9.2f}")
    print(f"{'plain venv + pip install -r (baseline)':<44}{figures['plain_pip_s']:>9.2f}")
    print(f"{'cached build / plain pip (target <= 1.3)':<44}{ratio:>9.2f}")
    print(f"{'start in the slug folder as is (ms)':<44}{figures['start_plain_ms']:>9.1f}")
    print(f"{'start with a fresh overlay at /app (ms)':<44}{figures['start_overlay_ms']:>9.1f}")
    print(f"{'copying the slug instead (ms)':<44}{figures['start_copy_ms']:>9.1f}")
    print(f"{'first deploy to 200 (cold build)':<44}{figures['first_deploy_s']:>9.2f}")
    print(f"{'redeploy to first 200 (target <= 5)':<44}{figures['redeploy_to_200_s']:>9.2f}")
    print(f"{'scale-out 1 -> 10 healthy (target <= 5)':<44}{figures['scale_out_10_s']:>9.2f}")
    print(json.dumps({"build_ratio_cached": round(ratio, 3), **figures}))


if __name__ == "__main__":
    main()
