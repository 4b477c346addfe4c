"""The balancer in platform mode on a private ledger: it reads the routes view through the
API with its own balancer token (the ledger's ports given to it lead nowhere: it holds no
ledger credentials), follows a route change, and a balancer restarted (kill -9) while the
API is down still routes, from the last routes it read (its cache), instead of answering
404 for every app. The routing endpoint opens to that balancer's token only."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest
import requests

from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from tests.backends import Upstream
from tests.conftest import destroy_cluster, free_ports, make_cluster
from tests.fixtures.apps.fleet import ApiProc, Daemon
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


def seed(ledger: Ledger, app: str, backend: Upstream) -> None:
    """An app whose one healthy web instance is `backend`."""
    ledger.append(f"app-{app}", [
        NewEvent("AppCreated", {"name": app, "owner": "ann"}),
        NewEvent("ReleaseCreated", {"app": app, "release": 1, "bundle_digest": "0" * 64,
                                    "procfile": {"web": "true"}, "config_version": 0})])
    ledger.append("host-c1", [NewEvent("HostRegistered", {
        "host_id": "c1", "address": "127.0.0.1", "port_min": backend.port,
        "port_max": backend.port, "capacity": 1})])
    ledger.append(f"placement-{app}1", [NewEvent("InstancePlaced", {
        "instance_id": f"{app}1", "app": app, "release": 1, "process_type": "web",
        "host_id": "c1", "port": backend.port})])
    ledger.append(f"instance-{app}1", [NewEvent("InstanceHealthy", {
        "instance_id": f"{app}1", "host_id": "c1"})])


def test_routes_through_the_api_and_from_the_cache_while_the_api_is_down(
        private: Cluster) -> None:
    backend = Upstream("a")
    port = free_ports(1)[0]
    nowhere = [f"tcp://127.0.0.1:{p}" for p in free_ports(2)]  # no relay: timers
    api = ApiProc(private, "api-balancer")
    home = private.root.parent
    daemons: list[Daemon] = [api]

    def balancer() -> Daemon:
        d = Daemon(private, "balancer", ["balancer", "--bind", f"127.0.0.1:{port}",
                                         "--balancer-id", "bt"],
                   TALLY_BALANCER_API=api.url, TALLY_BALANCER_TOKEN=api.token("bt", "balancer"),
                   TALLY_RELAYS=",".join(nowhere),  # nor another session's log collector:
                   TALLY_COLLECTOR=f"tcp://127.0.0.1:{free_ports(1)[0]}",
                   TALLY_LEDGER_PORTS=",".join(map(str, free_ports(2))))  # no ledger
        d.start()
        daemons.append(d)
        return d

    try:
        with Ledger(private.dsn()) as ledger:
            seed(ledger, "cached", backend)
        api.start()
        projectors = Daemon(private, "projectors", ["projectors", "--poll-interval", "0.2"])
        projectors.start()
        daemons.append(projectors)
        first = balancer()
        wait_until(lambda: status(port, "cached.tally.local") == 200, 60,
                   "the balancer never routed from the routes view through the API")
        assert status(port, "nope.tally.local") == 404
        assert (home / "run" / f"balancer-{port}.routes.json").exists()

        with Ledger(private.dsn()) as ledger:
            ledger.append("app-cached", [NewEvent("MaintenanceChanged", {
                "app": "cached", "enabled": True})])
        wait_until(lambda: status(port, "cached.tally.local") == 503, 30,
                   "the balancer never saw the app go into maintenance")

        first.kill()
        api.kill()  # the API is down
        balancer()
        wait_until(lambda: status(port, "cached.tally.local") == 503, 30,
                   "a balancer started while the API is down did not route from its cache")
        assert "routes not read" in (home / "balancer.log").read_text()
    finally:
        for d in daemons:
            d.kill()
        backend.close()


def test_the_routing_table_opens_to_its_balancer_only(private: Cluster) -> None:
    api = ApiProc(private, "api-routing")
    api.start()
    try:
        url = f"{api.url}/balancers/bx/routing"

        def get(token: str | None, u: str = url) -> requests.Response:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return requests.get(u, headers=headers, timeout=10)

        mine = get(api.token("bx", "balancer"))
        assert mine.status_code == 200, mine.text
        assert mine.json()["changed"] is False  # nothing routed yet: version 0 = after 0
        assert get(None).status_code == 401
        assert get(api.token("by", "balancer")).status_code == 403  # another balancer's
        assert get(api.token("bx")).status_code == 403  # an agent token of that host id
        assert get(api.token("bx", "balancer"), url + "?after=-1").status_code == 422
        # A balancer token opens nothing else: not the fleet's routes, not the hosts.
        for path in ("/routes", "/hosts", "/apps"):
            assert get(api.token("bx", "balancer"), api.url + path).status_code == 403, path
    finally:
        api.kill()
