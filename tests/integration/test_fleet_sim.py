"""The fleet simulator at small scale over the real control plane (relays, projectors, API,
placer): every heartbeat the API accepted is in the ledger (no batch lost), the placer
places on simulated hosts and they report, and hosts that go silent are declared lost."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agents.simulated import SimSettings, Simulation
from ledger import Ledger
from ledger.cluster import Cluster
from tally.simulation import host_ids, issue_tokens
from tests.conftest import destroy_cluster, make_cluster
from tests.fixtures.apps.fleet import ControlPlane, count_events, last_event_id, sim_apps
from tests.waiting import wait_until

HOSTS = 200
SILENT = 20
TTL = 5.0


@pytest.fixture(scope="module")
def private() -> Iterator[Cluster]:
    c = make_cluster()
    yield c
    destroy_cluster(c)


def test_two_hundred_simulated_hosts(private: Cluster) -> None:
    plane = ControlPlane(private, ttl=TTL)
    plane.start()
    ids = host_ids(HOSTS)
    silent = ids[:SILENT]
    sim = None
    try:
        with Ledger(private.dsn()) as ledger:
            apps = sim_apps(ledger, 10)
            tokens = issue_tokens(ledger, ids)
        start = last_event_id(private)
        sim = Simulation(tokens, SimSettings(plane.api.url, interval=1.0), processes=2,
                         silent_hosts=silent)
        sim.start()
        # the placer puts the apps' instances on simulated hosts; they report them
        wait_until(lambda: count_events(private, "InstanceHealthy", start) >= len(apps), 180,
                   "every app's instance reported healthy by a simulated host")
        wait_until(lambda: sim.counts().heartbeats >= 2 * HOSTS, 60, "two rounds of beats")

        lost_from = last_event_id(private)
        sim.silent.set()
        wait_until(lambda: count_events(private, "HostLost", lost_from,
                                        streams=[f"host-{h}" for h in silent]) == SILENT,
                   TTL + 30, f"{SILENT} silent hosts declared lost")
        assert count_events(private, "HostLost", lost_from, like="host-sim%") == SILENT

        sim.close()
        counts = sim.counts()
        assert counts.refused == 0 and counts.failed == 0, counts
        # no heartbeat batch lost: every 202 is an event
        recorded = wait_until(lambda: (n := count_events(
            private, "HostHeartbeat", start, like="heartbeat-sim%")) >= counts.heartbeats
            and n or None, 30, f"all {counts.heartbeats} accepted heartbeats in the ledger")
        assert recorded == counts.heartbeats, (recorded, counts, plane.api.log()[-2000:])
    finally:
        if sim is not None:
            sim.close()
        plane.stop()
