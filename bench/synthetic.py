"""A realistic, reproducible history of a fleet, as batch appends: hosts heartbeating,
the placer placing and withdrawing instances, agents reporting them starting, healthy,
crashing and stopping, developers releasing, scaling and adding domains, hosts getting lost
and coming back, backups running. For the benchmark and the crash tests; not used in
production.

Roughly half the events are heartbeats, a third instance events, a sixth placements.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from ledger import Ledger, NewEvent

Append = tuple[str, list[NewEvent]]
DIGESTS = [f"{i:064x}" for i in range(1, 9)]


def fleet_history(n_events: int, *, hosts: int = 12, apps: int = 30, seed: int = 7,
                  prefix: str = "") -> Iterator[Append]:
    """Appends totalling about `n_events` events (each append at most 1000 events).
    `prefix` keeps names apart when several histories share a ledger."""
    rnd = random.Random(seed)
    host_ids = [f"{prefix}h{i}" for i in range(hosts)]
    app_names = [f"{prefix}app{i:03d}" for i in range(apps)]
    live: dict[str, list[tuple[str, str]]] = {a: [] for a in app_names}  # app -> (iid, host)
    release = dict.fromkeys(app_names, 1)
    made = 0
    counter = 0

    def emit(stream: str, events: list[NewEvent]) -> Iterator[Append]:
        nonlocal made
        for i in range(0, len(events), 1000):
            chunk = events[i:i + 1000]
            made += len(chunk)
            yield stream, chunk

    for i, h in enumerate(host_ids):
        yield from emit(f"host-{h}", [NewEvent("HostRegistered", {
            "host_id": h, "address": f"10.0.{i // 250}.{i % 250 + 1}", "port_min": 20000,
            "port_max": 29999, "capacity": 40})])
    for a in app_names:
        yield from emit(f"app-{a}", [
            NewEvent("AppCreated", {"name": a, "owner": "ann"}),
            NewEvent("ReleaseCreated", {"app": a, "release": 1, "bundle_digest": DIGESTS[0],
                                        "procfile": {"web": "gunicorn app:app"},
                                        "config_version": 0}),
            NewEvent("ScaleChanged", {"app": a, "scale": {"web": 2}}),
            NewEvent("DomainAdded", {"app": a, "domain": f"{a}.example.com"}),
        ])
    while made < n_events:
        for h in host_ids:
            yield from emit(f"heartbeat-{h}", [
                NewEvent("HostHeartbeat", {"host_id": h, "load": round(rnd.random() * 4, 2),
                                           "instances": rnd.randint(0, 40)})
                for _ in range(rnd.randint(3, 9))])
        for a in rnd.sample(app_names, k=max(1, apps // 3)):
            placement, instance_appends = [], []
            adding = rnd.randint(1, 3)
            dropping = max(rnd.randint(0, 2), len(live[a]) + adding - 5)
            for iid, host in live[a][:dropping]:
                placement.append(NewEvent("InstanceUnplaced", {"instance_id": iid, "app": a,
                                                               "reason": "rebalanced"}))
                instance_appends.append((f"instance-{iid}", [NewEvent(
                    "InstanceStopped", {"instance_id": iid, "host_id": host})]))
                live[a].remove((iid, host))
            for _ in range(adding):
                counter += 1
                iid, host = f"{prefix}i{counter}", rnd.choice(host_ids)
                placement.append(NewEvent("InstancePlaced", {
                    "instance_id": iid, "app": a, "release": release[a],
                    "process_type": "web", "host_id": host,
                    "port": 20000 + counter % 9999}))
                live[a].append((iid, host))
                instance_appends.append((f"instance-{iid}", _lifecycle(rnd, iid, host)))
            yield from emit(f"placement-{a}", placement)
            for stream, events in instance_appends:
                yield from emit(stream, events)
        yield from _now_and_then(rnd, app_names, host_ids, release, emit)


def _lifecycle(rnd: random.Random, iid: str, host: str) -> list[NewEvent]:
    """Start and pass health checks; one in five crashes a few times first."""
    ids = {"instance_id": iid, "host_id": host}
    events = []
    if rnd.random() < 0.2:
        for restarts in range(rnd.randint(1, 4)):
            events += [NewEvent("InstanceStarted", {**ids, "pid": rnd.randint(100, 60000)}),
                       NewEvent("InstanceExited", {**ids, "exit_code": 1, "restarts": restarts,
                                                   "log_tail": ["ImportError: no module"]})]
    events += [NewEvent("InstanceStarted", {**ids, "pid": rnd.randint(100, 60000)}),
               NewEvent("InstanceHealthy", ids)]
    return events


def _now_and_then(rnd: random.Random, apps: list[str], hosts: list[str],
                  release: dict[str, int], emit) -> Iterator[Append]:  # type: ignore[no-untyped-def]
    """The rarer facts: releases, scaling, maintenance, lost hosts, backups."""
    a = rnd.choice(apps)
    if rnd.random() < 0.5:
        release[a] += 1
        yield from emit(f"app-{a}", [NewEvent("ReleaseCreated", {
            "app": a, "release": release[a], "bundle_digest": rnd.choice(DIGESTS),
            "procfile": {"web": "gunicorn app:app", "worker": "python worker.py"},
            "config_version": 0})])
    if rnd.random() < 0.3:
        yield from emit(f"app-{a}", [
            NewEvent("ScaleChanged", {"app": a, "scale": {"web": rnd.randint(0, 4)}}),
            NewEvent("MaintenanceChanged", {"app": a, "enabled": rnd.random() < 0.2})])
    if rnd.random() < 0.1:
        h = rnd.choice(hosts)
        yield from emit(f"host-{h}", [NewEvent("HostLost", {"host_id": h, "reason": "TTL"})])
    if rnd.random() < 0.1:
        bid = f"b{rnd.randint(1, 10**9)}"
        yield from emit("backup-ledger", [
            NewEvent("BackupStarted", {"backup_id": bid, "target": "ledger"}),
            NewEvent("BackupCompleted", {"backup_id": bid, "target": "ledger",
                                         "size_bytes": rnd.randint(1, 10**9),
                                         "location": f"s3://b/{bid}", "digest": DIGESTS[1]})])


def fill(ledger: Ledger, appends: Iterator[Append]) -> int:
    """Append them all; returns the number of events."""
    total = 0
    for stream, events in appends:
        ledger.append(stream, events)
        total += len(events)
    return total
