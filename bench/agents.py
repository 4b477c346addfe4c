"""Agents benchmark: deploy to first 200, host failover, and the placer's decision time.

    .venv/bin/python bench/agents.py [--quick]

- deploy: a private ledger cluster, two relays, a placer and two host agents on this
  machine. Time from appending a release of the sample app (what `tally deploy` does once
  the bundle is stored; requirements already cached) to the first 200 from an instance of
  that release; p50 over the deploys. Baseline: the same app started by hand with gunicorn
  from the same virtualenv, to its first 200 (what the platform adds is the difference).
- failover: kill -9 one host's agent and its apps; time until the app's instances are
  healthy on the other host. The floor is the TTL (target: TTL + 5 s).
- placer: `decide()` over 1,000 simulated hosts and 10,000 instances (2,000 apps x 5),
  placing everything from scratch and in the steady state. Baseline: folding the same
  events (reading, no deciding).

Ends with one JSON line: deploy_p50_s, failover_s, placer_reconcile_s (+ context).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents import slug  # noqa: E402
from agents.fleet import Fleet  # noqa: E402
from agents.placement import Settings, decide  # noqa: E402
from bench.rollout import first_200, fleet_now, time_to_serve  # noqa: E402
from ledger import Ledger  # noqa: E402
from ledger.events import RecordedEvent  # noqa: E402
from tests.conftest import RelayProcs, destroy_cluster, free_ports, make_cluster  # noqa: E402
from tests.fixtures.apps import app_tarball, slug_for  # noqa: E402
from tests.fixtures.apps.fleet import (  # noqa: E402
    AgentProc,
    create_app,
    placer,
    release,
    scale,
)
from tests.waiting import wait_until  # noqa: E402


def unpacked_slug() -> Path:
    """The sample app's slug (built once per machine), unpacked in a scratch folder."""
    store = Path(tempfile.gettempdir()) / "tally-bench-slug"
    digest, _ = slug_for(app_tarball("hello"), store)
    return slug.unpack(store / f"{digest}.tar.gz", digest, store / "unpacked", None)


def baseline_start() -> float:
    """gunicorn started by hand from the unpacked slug's virtualenv, to its first 200."""
    app = unpacked_slug()
    (port,) = free_ports(1)
    t0 = time.monotonic()
    proc = subprocess.Popen([str(app / ".venv" / "bin" / "python"), "-m", "gunicorn",
                             "--bind", f"127.0.0.1:{port}", "app:app"], cwd=app,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert first_200(port, None, time.monotonic() + 30), "baseline gunicorn never answered"
        return time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()


def fleet_bench(deploys: int, ttl: float) -> dict[str, float]:
    cluster = make_cluster()
    relays = RelayProcs(cluster)
    agents: list[AgentProc] = []
    the_placer = placer(cluster, [], ttl=ttl)
    try:
        relays.start(0)
        relays.start(1)
        the_placer = placer(cluster, relays.endpoints, ttl=ttl)
        low = free_ports(1)[0]
        agents = [AgentProc(cluster, f"h{i}", (low + 50 * i, low + 50 * i + 49),
                            relays.endpoints) for i in (1, 2)]
        for a in agents:
            a.start()
        the_placer.start()
        home = cluster.root.parent
        with Ledger(cluster.dsn()) as led:
            def fleet() -> Fleet:
                return fleet_now(led)

            wait_until(lambda: len([h for h in fleet().hosts.values() if h.last_heartbeat]) == 2,
                     30, "both agents")
            create_app(led, "bench", {"GREETING": "hi"})
            scale(led, "bench", web=1)
            times = []
            for n in range(1, deploys + 1):
                t0 = time.monotonic()
                release(led, home, "bench", "hello", n, config_version=1)
                times.append(time_to_serve(led, "bench", n, t0))
            scale(led, "bench", web=2)
            wait_until(lambda: sorted(p.host_id for p in fleet().placements_of("bench")
                                    if fleet().instance(p.instance_id).state == "healthy")
                     == ["h1", "h2"], 60, "one instance per host")
            victim = agents[0]
            t0 = time.monotonic()
            victim.kill()
            victim.kill_apps()

            def moved() -> bool:
                f = fleet()
                ps = f.placements_of("bench")
                return len(ps) == 2 and all(
                    p.host_id == "h2" and f.instance(p.instance_id).state == "healthy"
                    for p in ps)

            wait_until(moved, ttl + 60, "failover")
            failover = time.monotonic() - t0
    finally:
        for a in agents:
            a.kill()
            a.kill_apps()
        the_placer.kill()
        relays.stop()
        destroy_cluster(cluster)
    return {"deploy_p50_s": statistics.median(times), "deploy_all_s": times,
            "failover_s": failover}


def synthetic(hosts: int, apps: int, per_app: int) -> tuple[list[RecordedEvent], datetime]:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    events: list[RecordedEvent] = []

    def add(stream: str, type_: str, **data: object) -> None:
        n = len(events) + 1
        events.append(RecordedEvent(n, n, stream, 1, type_, data, {}, now))

    for h in range(hosts):
        add(f"host-s{h}", "HostRegistered", host_id=f"s{h}", address="10.0.0.1",
            port_min=7000, port_max=7999, capacity=40)
        add(f"heartbeat-s{h}", "HostHeartbeat", host_id=f"s{h}")
    for a in range(apps):
        name = f"app{a:05d}"
        add(f"app-{name}", "AppCreated", name=name, owner="bench")
        add(f"app-{name}", "ReleaseCreated", app=name, release=1, bundle_digest="0" * 64,
            procfile={"web": "gunicorn app:app"}, config_version=0)
        add(f"app-{name}", "ScaleChanged", app=name, scale={"web": per_app})
    return events, now + timedelta(seconds=1)


def placer_bench(hosts: int = 1000, apps: int = 2000, per_app: int = 5) -> dict[str, float]:
    events, now = synthetic(hosts, apps, per_app)
    t0 = time.perf_counter()
    fleet = Fleet()
    fleet.apply_all(events)
    fold = time.perf_counter() - t0
    t0 = time.perf_counter()
    appends = decide(fleet, now, Settings())
    scratch = time.perf_counter() - t0
    placed = sum(1 for a in appends for e in a.events if e.type == "InstancePlaced")
    assert placed == apps * per_app, placed
    pos = len(events)
    for a in appends:  # record the decisions, as the ledger would, then decide again
        for e in a.events:
            pos += 1
            fleet.apply(RecordedEvent(pos, pos, a.stream, a.expected_version + 1, e.type,
                                      e.data, {}, now))
    t0 = time.perf_counter()
    again = decide(fleet, now, Settings())
    steady = time.perf_counter() - t0
    return {"placer_reconcile_s": scratch, "placer_steady_s": steady,
            "placer_fold_baseline_s": fold, "placer_instances": placed,
            "placer_steady_appends": len(again)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 deploys, TTL 5 s (< 120 s)")
    args = parser.parse_args()
    deploys, ttl = (3, 5.0) if args.quick else (5, 15.0)
    unpacked_slug()  # "requirements already cached": the slug is built
    base = statistics.median(baseline_start() for _ in range(3))
    figures = fleet_bench(deploys, ttl)
    figures.update(placer_bench())
    print(f"deploy to first 200, p50 of {deploys}: {figures['deploy_p50_s']:.2f} s "
          f"(target <= 5 s; gunicorn by hand: {base:.2f} s)")
    print(f"failover, kill -9 to healthy elsewhere: {figures['failover_s']:.2f} s "
          f"(ttl {ttl:g} s; target <= {ttl + 5:g} s)")
    print(f"placer, {figures['placer_instances']} instances on 1000 hosts: from scratch "
          f"{figures['placer_reconcile_s']:.3f} s, steady {figures['placer_steady_s']:.3f} s "
          f"(target <= 1 s; folding the events alone: {figures['placer_fold_baseline_s']:.3f} s)")
    print(json.dumps({**figures, "baseline_gunicorn_start_s": base, "ttl_s": ttl,
                      "quick": args.quick}))


if __name__ == "__main__":
    main()
