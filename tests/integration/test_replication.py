"""Replication and failover on a private cluster: nothing acknowledged is ever lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from ledger.errors import ClusterError
from ledger.subscriber import Subscriber
from tests.conftest import RelayProcs, destroy_cluster, make_cluster, on_node, tally_env
from tests.waiting import wait_until


@pytest.fixture
def private_cluster() -> Iterator[Cluster]:
    c = make_cluster()
    yield c
    destroy_cluster(c)


class Writer(threading.Thread):
    """Appends heartbeats until told to stop, remembering every acknowledged append."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.ledger = Ledger(dsn, retry_deadline=60)
        self.acked: list[tuple[int, int]] = []  # (event id, stream version)
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set():
                n += 1
                r = self.ledger.append("heartbeat-failover", [NewEvent(
                    "HostHeartbeat", {"host_id": "failover", "instances": n})])
                self.acked.append((r.event_ids[0], r.versions[0]))
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            self.ledger.close()


def test_status_shows_a_synchronous_standby(private_cluster: Cluster) -> None:
    out = subprocess.run([sys.executable, "-m", "tally.cli", "ledger", "status"],
                         env=tally_env(private_cluster), capture_output=True, text=True,
                         check=True).stdout
    assert "node a" in out and "primary" in out and "streaming, sync" in out
    assert "node b" in out and "standby" in out


def test_promote_is_refused_while_the_primary_runs(private_cluster: Cluster) -> None:
    with pytest.raises(ClusterError, match="still running"):
        private_cluster.promote("b")
    out = subprocess.run([sys.executable, "-m", "tally.cli", "ledger", "promote"],
                         env=tally_env(private_cluster), capture_output=True, text=True)
    assert out.returncode == 1 and "still running" in out.stderr
    assert "Traceback" not in out.stderr


def test_kill_primary_promote_standby_loses_nothing(private_cluster: Cluster) -> None:
    cluster = private_cluster
    relay = RelayProcs(cluster)
    relay.start(0)
    relay.wait_ready(0)
    sub = Subscriber(relay.endpoints[:1])
    writer = Writer(cluster.dsn())
    writer.start()
    wait_until(lambda: len(writer.acked) >= 200, 60, "writer made no progress")

    # An acknowledged append is on the standby (flushed there before the ack; visible
    # once replayed).
    last_id = writer.acked[-1][0]
    wait_until(lambda: on_node(cluster, "b", "SELECT 1 FROM ledger.events WHERE id = %s",
                               (last_id,)), 10, "acknowledged event not on the standby")

    os.kill(cluster.postmaster_pid("a"), signal.SIGKILL)
    wait_until(lambda: not cluster._running("a"), 10, "primary postmaster still alive")
    acked_before = len(writer.acked)
    cluster.promote("b")
    wait_until(lambda: len(writer.acked) >= acked_before + 200, 60,
               "appends did not continue on the new primary")
    writer.stop.set()
    writer.join(30)
    assert writer.error is None, writer.error

    stored = dict(on_node(cluster, "b", "SELECT id, version FROM ledger.events "
                                       "WHERE stream = 'heartbeat-failover'"))
    missing = [a for a in writer.acked if stored.get(a[0]) != a[1]]
    assert not missing, f"{len(missing)} acknowledged appends lost, e.g. {missing[:3]}"
    versions = sorted(stored.values())
    assert versions == list(range(1, len(versions) + 1)), "stream versions have a hole"

    # Sequencing resumes on the new primary: every event gets one dense position.
    with Ledger(cluster.dsn()) as ledger:
        head = ledger.sequence()
        positions = [p for (p,) in on_node(cluster, "b", "SELECT position FROM "
                                           "ledger.positions ORDER BY position")]
        assert positions == list(range(1, head + 1))
        (unplaced,), = on_node(cluster, "b", "SELECT count(*) FROM ledger.events e WHERE "
                               "NOT EXISTS (SELECT 1 FROM ledger.positions p "
                               "WHERE p.event_id = e.id)")
        assert unplaced == 0

    # The relay found the new primary by itself and still wakes subscribers.
    try:
        wait_until(lambda: sub.wait(0.2) and sub.head >= head, 30,
                   "relay did not follow the failover")
    finally:
        sub.close()
        relay.stop()

    # The old primary comes back as the synchronous standby of the new one.
    cluster.rejoin("a")
    def roles() -> dict[str, str]:
        status = {n.name: n for n in cluster.status()}
        sync = [r["sync_state"] for r in status["b"].replication]
        return {"a": status["a"].role, "b": status["b"].role, "sync": ",".join(sync)}
    wait_until(lambda: roles() == {"a": "standby", "b": "primary", "sync": "sync"}, 20,
               "old primary did not become the synchronous standby")
    with Ledger(cluster.dsn()) as ledger:
        ledger.append("heartbeat-failover", [NewEvent("HostHeartbeat", {"host_id": "x"})])


def test_cli_manages_a_cluster_from_scratch() -> None:
    """What `make up` does first: init, status, stop, start, from the command line."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from tests.conftest import free_ports

    home = Path(tempfile.mkdtemp(prefix="tally-cli-"))
    home.chmod(0o755)
    env = {**os.environ, "TALLY_HOME": str(home), "TALLY_LEDGER_HA": "plain",
           "TALLY_LEDGER_PORTS": ",".join(map(str, free_ports(2)))}

    def tally(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tally.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)
    try:
        missing = tally("ledger", "status")
        assert missing.returncode == 1 and "tally ledger init" in missing.stderr
        assert tally("ledger", "init").returncode == 0
        again = tally("ledger", "init")
        assert again.returncode == 1 and "not empty" in again.stderr
        nodes = json.loads(tally("ledger", "status", "--json").stdout)
        assert [(n["name"], n["role"]) for n in nodes] == [("a", "primary"), ("b", "standby")]
        assert tally("ledger", "stop").returncode == 0
        assert {n["role"] for n in json.loads(tally("ledger", "status", "--json").stdout)} == {
            "stopped"}
        assert tally("ledger", "start").returncode == 0
        assert "streaming, sync" in tally("ledger", "status").stdout
    finally:
        tally("ledger", "stop", "--mode", "immediate")
        shutil.rmtree(home, ignore_errors=True)


def test_killed_nodes_restart_and_resume(private_cluster: Cluster) -> None:
    """kill -9 of the standby, then of the primary: `tally ledger start` brings each back
    (stale lock files of an unreaped postmaster notwithstanding) with nothing lost."""
    cluster = private_cluster
    with Ledger(cluster.dsn(), retry_deadline=60) as ledger:
        first = ledger.append("heartbeat-k", [NewEvent("HostHeartbeat", {"host_id": "k"})])
        for node in ("b", "a"):
            os.kill(cluster.postmaster_pid(node), signal.SIGKILL)
            wait_until(lambda n=node: not cluster._running(n), 10, f"{node} still running")
            cluster.start()
            wait_until(lambda: any(r["sync_state"] == "sync" for n in cluster.status()
                                   for r in n.replication), 30, "no synchronous standby")
            ledger.append("heartbeat-k", [NewEvent("HostHeartbeat", {"host_id": "k"})])
        assert [e.id for e in ledger.read_stream("heartbeat-k")][0] == first.event_ids[0]
        assert ledger.stream_version("heartbeat-k") == 3
