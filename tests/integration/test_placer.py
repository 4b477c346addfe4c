"""Two `tally serve placer` processes on a private ledger cluster: no double placement, and a
silent host is declared lost once, its instances placed elsewhere."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from agents.fleet import Fleet
from agents.placer import catch_up
from ledger import Ledger, NewEvent
from ledger.builds import build_stream
from ledger.cluster import Cluster
from tests.conftest import destroy_cluster, make_cluster, tally_env
from tests.waiting import wait_until

APPS = [f"app-{i:02d}" for i in range(8)]


@pytest.fixture(scope="module")
def private() -> Iterator[Cluster]:
    """Placers place every app of their ledger: give them one of their own."""
    c = make_cluster()
    yield c
    destroy_cluster(c)


class Heartbeats(threading.Thread):
    """Heartbeats for some hosts every 0.3 s, until told to stop one or all."""

    def __init__(self, dsn: str, hosts: set[str]) -> None:
        super().__init__(daemon=True)
        self.dsn, self.hosts, self.done = dsn, set(hosts), threading.Event()

    def run(self) -> None:
        with Ledger(self.dsn) as ledger:
            while not self.done.wait(0.3):
                for h in sorted(self.hosts):
                    ledger.append(f"heartbeat-{h}", [NewEvent("HostHeartbeat", {"host_id": h})])


def start_placer(cluster: Cluster, n: int) -> subprocess.Popen:
    with open(cluster.root.parent / f"placer-{n}.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tally.cli", "serve", "placer", "--ttl", "3",
             "--suspect-after", "1.5", "--interval", "0.2"],
            env=tally_env(cluster), stdout=log, stderr=log)


def fleet_of(ledger: Ledger) -> Fleet:
    fleet = Fleet()
    catch_up(ledger, fleet)
    return fleet


def test_two_placers_never_double_place_and_replace_a_lost_host(private: Cluster) -> None:
    dsn = private.dsn()
    with Ledger(dsn) as ledger:
        for i, h in enumerate(["h1", "h2"]):
            ledger.append(f"host-{h}", [NewEvent("HostRegistered", {
                "host_id": h, "address": "127.0.0.1", "port_min": 7000 + 100 * i,
                "port_max": 7099 + 100 * i, "capacity": 50})])
        beats = Heartbeats(dsn, {"h1", "h2"})
        beats.start()
        placers = [start_placer(private, n) for n in range(2)]
        try:
            for app in APPS:  # both placers race for each of these
                ledger.append(f"app-{app}", [
                    NewEvent("AppCreated", {"name": app, "owner": "ann"}),
                    NewEvent("ReleaseCreated", {"app": app, "release": 1,
                                                "bundle_digest": "b" * 64,
                                                "procfile": {"web": "gunicorn a:app"},
                                                "config_version": 0}),
                    NewEvent("ScaleChanged", {"app": app, "scale": {"web": 3}})])
                ledger.append(build_stream(app, 2), [  # placed only once built
                    NewEvent("BuildStarted", {"app": app, "release": 1, "builder": "b",
                                              "lease_s": 30}),
                    NewEvent("BuildSucceeded", {"app": app, "release": 1,
                                                "slug_digest": "c" * 64, "size_bytes": 1,
                                                "seconds": 1.0})])

            def spread() -> bool:
                f = fleet_of(ledger)
                per_app = Counter(p.app for p in f.placements.values())
                return all(per_app[a] == 3 for a in APPS)

            wait_until(spread, 30, "every app placed 3 times")
            fleet = fleet_of(ledger)
            for app in APPS:
                hosts = Counter(p.host_id for p in fleet.placements_of(app))
                assert sorted(hosts.values()) == [1, 2], hosts  # spread over both hosts
            beats.hosts.discard("h1")  # h1 goes silent

            def replaced() -> bool:
                f = fleet_of(ledger)
                return (f.hosts["h1"].lost and all(
                    {p.host_id for p in f.placements_of(a)} == {"h2"}
                    and len(f.placements_of(a)) == 3 for a in APPS))

            wait_until(replaced, 30, "h1 lost and its instances placed on h2")
        finally:
            for p in placers:
                p.terminate()
            for p in placers:
                assert p.wait(10) == 0
            beats.done.set()
            beats.join()
        events = ledger.read_all(0, limit=100_000, categories=["host", "placement"])
        assert [e.type for e in events if e.stream == "host-h1"].count("HostLost") == 1
        placed = Counter(e.data["app"] for e in events if e.type == "InstancePlaced")
        moved = Counter(e.data["app"] for e in events if e.type == "InstanceUnplaced")
        for app in APPS:
            assert placed[app] == 3 + moved[app], (app, placed[app], moved[app])
        fleet = fleet_of(ledger)
        ports = [(p.host_id, p.port) for p in fleet.placements.values()]
        assert len(ports) == len(set(ports)) == 3 * len(APPS)
