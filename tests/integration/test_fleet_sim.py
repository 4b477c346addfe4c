"""The fleet simulator at small scale over the real control plane (relays, projectors, API,
placer): every heartbeat the API accepted is in the ledger (no batch lost), the placer
places on simulated hosts and they report, and hosts that go silent are declared lost."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agents.simulated import SimSettings, Simulation
from ledger import Ledger
from ledger.cluster import Cluster
from tally.simulation import host_ids, issue_tokens
from tests.conftest import tally_env
from tests.fixtures.apps.fleet import ControlPlane, count_events, last_event_id, sim_apps
from tests.waiting import wait_until

HOSTS = 200
SILENT = 20
TTL = 5.0



@pytest.fixture(scope="module")
def plane(private: Cluster) -> Iterator[ControlPlane]:
    p = ControlPlane(private, ttl=TTL)
    p.start()
    yield p
    p.stop()


def test_two_hundred_simulated_hosts(private: Cluster, plane: ControlPlane) -> None:
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


def test_tally_sim_runs_hosts_with_tokens_it_keeps(private: Cluster, plane: ControlPlane) -> None:
    """`tally sim` as an operator runs it: it issues its hosts' agent tokens once and keeps
    them in secrets/sim-tokens.json (0600), its hosts register and beat over the API, and it
    ends with one JSON line of what was accepted. A second run reuses the tokens."""
    def sim() -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "tally.cli", "sim", "--hosts", "20", "--prefix", "op",
             "--api", plane.api.url, "--interval", "0.5", "--duration", "3"],
            env=tally_env(private), capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "20 hosts registered" in done.stderr and "heartbeats/s" in done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    start = last_event_id(private)
    first = sim()
    assert first["hosts"] == 20 and first["heartbeats_per_s"] > 0, first
    assert first["refused"] == 0 and first["failed"] == 0, first
    saved = private.root.parent / "secrets" / "sim-tokens.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert sorted(json.loads(saved.read_text())) == host_ids(20, "op")
    users = count_events(private, "UserCreated", start, like="user-sim-op%")
    assert users == 20
    assert count_events(private, "HostRegistered", start, like="host-op%") == 20
    assert count_events(private, "HostHeartbeat", start, like="heartbeat-op%") > 0
    second = sim()
    assert second["heartbeats_per_s"] > 0 and second["refused"] == 0, second
    assert count_events(private, "UserCreated", start, like="user-sim-op%") == users

    bad = subprocess.run([sys.executable, "-m", "tally.cli", "sim", "--hosts", "1",
                          "--prefix", "Bad Prefix"], env=tally_env(private),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--prefix" in bad.stderr and "Traceback" not in bad.stderr
