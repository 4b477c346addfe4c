"""Two `tally serve placer` processes on a private ledger cluster: no double placement, and a
silent host is declared lost once, its instances placed elsewhere."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter

import psycopg2

from agents.fleet import Fleet
from agents.placer import catch_up
from ledger import Ledger, NewEvent
from ledger.builds import build_stream
from ledger.cluster import Cluster
from tests.conftest import tally_env
from tests.waiting import wait_until

APPS = [f"app-{i:02d}" for i in range(8)]



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


def test_rounds_back_to_back_read_their_own_appends(private: Cluster) -> None:
    """A round right after another (as on a wake-up) first reads the events the last one
    appended, so it never decides the same again: no conflict with itself, every new app
    placed once, each round's appends in one transaction."""
    from agents.placement import Settings
    from agents.placer import Placer
    from tests.fixtures.apps.fleet import sim_apps

    with Ledger(private.dsn()) as ledger:
        for h in ("bb1", "bb2"):
            ledger.append(f"host-{h}", [NewEvent("HostRegistered", {
                "host_id": h, "address": "127.0.0.1", "port_min": 9000 if h == "bb1" else 9100,
                "port_max": 9049 if h == "bb1" else 9149, "capacity": 50})])
            ledger.append(f"heartbeat-{h}", [NewEvent("HostHeartbeat", {"host_id": h})])
        placer = Placer(ledger, Settings(ttl=60, suspect_after=30))
        placer.reconcile()  # whatever the earlier test left, and the liveness timings
        apps = sim_apps(ledger, 20, prefix="bb")
        ledger.sequence()
        # A session holding a transaction id keeps the sequencer from placing anything
        # committed after it (as a lagging standby or a slow writer would, for a moment):
        # the round's own appends land but stay unread until it lets go.
        holder = psycopg2.connect(private.dsn())
        letgo = threading.Timer(0.5, holder.rollback)
        try:
            holder.cursor().execute("SELECT pg_current_xact_id()")
            assert placer.reconcile() >= 20
            letgo.start()
            rounds = [placer.reconcile() for _ in range(3)]
        finally:
            letgo.cancel()
            if letgo.is_alive():
                letgo.join()
            holder.close()
        assert placer.conflicts == 0, rounds
        placed = Counter(e.data["app"] for e in ledger.read_all(
            0, limit=100_000, categories=["placement"], types=["InstancePlaced"])
            if e.data["app"] in apps)
        assert placed == {a: 1 for a in apps}
