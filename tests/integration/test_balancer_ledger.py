"""The balancer in ledger mode on a private ledger: it routes from the routes view, and a
balancer restarted (kill -9) while the ledger is down still routes, from the last routes
it read (its cache), instead of answering 404 for every app."""

from __future__ import annotations

import http.client
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from tests.backends import Upstream
from tests.conftest import destroy_cluster, free_ports, make_cluster, tally_env
from tests.waiting import wait_until


@pytest.fixture
def private() -> Iterator[Cluster]:
    c = make_cluster()
    yield c
    destroy_cluster(c)


def status(port: int, host: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": host})
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def test_routes_from_the_view_and_from_the_cache_while_the_ledger_is_down(
        private: Cluster) -> None:
    backend = Upstream("a")
    port = free_ports(1)[0]
    nowhere = ",".join(f"tcp://127.0.0.1:{p}" for p in free_ports(2))  # no relay: timers
    env = tally_env(private, TALLY_RELAYS=nowhere,  # nor another session's log collector
                    TALLY_COLLECTOR=f"tcp://127.0.0.1:{free_ports(1)[0]}")
    home = private.root.parent
    procs: list[subprocess.Popen] = []

    def daemon(*args: str) -> subprocess.Popen:
        with open(home / f"{args[0]}.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "serve", *args],
                                    env=env, stdout=log, stderr=log)
        procs.append(proc)
        return proc

    try:
        with Ledger(private.dsn()) as ledger:
            ledger.append("app-cached", [
                NewEvent("AppCreated", {"name": "cached", "owner": "ann"}),
                NewEvent("ReleaseCreated", {"app": "cached", "release": 1,
                                            "bundle_digest": "0" * 64,
                                            "procfile": {"web": "true"}, "config_version": 0})])
            ledger.append("host-c1", [NewEvent("HostRegistered", {
                "host_id": "c1", "address": "127.0.0.1", "port_min": backend.port,
                "port_max": backend.port, "capacity": 1})])
            ledger.append("placement-cached1", [NewEvent("InstancePlaced", {
                "instance_id": "cached1", "app": "cached", "release": 1,
                "process_type": "web", "host_id": "c1", "port": backend.port})])
            ledger.append("instance-cached1", [NewEvent("InstanceHealthy", {
                "instance_id": "cached1", "host_id": "c1"})])
        daemon("projectors", "--poll-interval", "0.2")
        balancer = daemon("balancer", "--bind", f"127.0.0.1:{port}")
        wait_until(lambda: status(port, "cached.tally.local") == 200, 60,
                   "the balancer never routed from the routes view")
        assert status(port, "nope.tally.local") == 404
        assert (home / "run" / f"balancer-{port}.routes.json").exists()

        balancer.kill()
        balancer.wait()
        private.stop()  # the ledger is down
        daemon("balancer", "--bind", f"127.0.0.1:{port}")
        wait_until(lambda: status(port, "cached.tally.local") == 200, 30,
                   "a balancer started while the ledger is down did not route from its cache")
        assert "routes not read" in (home / "balancer.log").read_text()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        backend.close()
