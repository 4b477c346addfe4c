"""Heartbeat retention: old beats go, each host's newest stays, other history is kept."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from ledger.retention import RetentionPolicy, apply, prune, status
from tally.console import parse_age
from tests.conftest import tally_env


def test_prune_keeps_the_newest_beat_of_each_host(cluster: Cluster, ledger: Ledger) -> None:
    host = "h" + uuid.uuid4().hex[:8]
    beats = [NewEvent("HostHeartbeat", {"host_id": host, "instances": n}) for n in range(5)]
    ledger.append(f"heartbeat-{host}", beats)
    ledger.append(f"host-{host}", [NewEvent("HostLost", {"host_id": host})])
    ledger.sequence()
    future = datetime.now(UTC) + timedelta(hours=1)
    policy = RetentionPolicy("heartbeat", timedelta(minutes=30))
    assert prune(cluster.dsn("tally_owner"), policy, now=future,
                 stream=f"heartbeat-{host}") == 4
    left = ledger.read_stream(f"heartbeat-{host}")
    assert [e.data["instances"] for e in left] == [4]
    assert len(ledger.read_stream(f"host-{host}")) == 1  # other categories untouched
    # Readers step over the hole; the sequencer carries on.
    ledger.append(f"heartbeat-{host}", [NewEvent("HostHeartbeat", {"host_id": host})])
    head = ledger.sequence()
    assert ledger.read_all(after=head - 1)[0].stream == f"heartbeat-{host}"


def test_recent_beats_are_kept(cluster: Cluster, ledger: Ledger) -> None:
    host = "h" + uuid.uuid4().hex[:8]
    ledger.append(f"heartbeat-{host}", [NewEvent("HostHeartbeat", {"host_id": host})] * 3)
    prune(cluster.dsn("tally_owner"), RetentionPolicy("heartbeat", timedelta(hours=1)),
          stream=f"heartbeat-{host}")
    assert len(ledger.read_stream(f"heartbeat-{host}")) == 3


def test_cli_refuses_to_prune_history_and_bad_ages(cluster: Cluster) -> None:
    def tally(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tally.cli", "ledger", "prune", *args],
                              env=tally_env(cluster), capture_output=True, text=True)
    refused = tally("--category", "app")
    assert refused.returncode == 1 and "history tally keeps" in refused.stderr
    bad = tally("--older-than", "soon")
    assert bad.returncode == 1 and "must look like" in bad.stderr
    ok = tally("--older-than", "30d")  # nothing in a test session is that old
    assert ok.returncode == 0 and "pruned" in ok.stderr


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("24h", 86400),
                                               ("7d", 604800)])
def test_parse_age(text: str, seconds: int) -> None:
    assert parse_age(text).total_seconds() == seconds


def test_the_schedule_records_what_it_removed_and_status_shows_it(cluster: Cluster) -> None:
    """`tally serve retention` runs apply() on its schedule: each run is a RetentionApplied
    event, and `tally ledger status` shows the ledger's size and what retention removed."""
    host = "h" + uuid.uuid4().hex[:8]
    with Ledger(cluster.dsn()) as ledger:
        ledger.append(f"heartbeat-{host}",
                      [NewEvent("HostHeartbeat", {"host_id": host, "instances": n})
                       for n in range(6)])
        before = status(ledger)["retention"]["heartbeat"]
        deleted = apply(cluster.dsn("tally_owner"), ledger,
                        RetentionPolicy("heartbeat", timedelta(0)))
        assert deleted >= 5 and len(ledger.read_stream(f"heartbeat-{host}")) == 1
        after = status(ledger)
    assert after["retention"]["heartbeat"]["runs"] == before["runs"] + 1
    assert after["retention"]["heartbeat"]["deleted_total"] == before["deleted_total"] + deleted
    assert after["retention"]["heartbeat"]["last_deleted"] == deleted
    assert after["bytes"] > 0
    out = subprocess.run([sys.executable, "-m", "tally.cli", "ledger", "status"],
                         capture_output=True, text=True, env=tally_env(cluster), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "MiB" in out.stdout and f"({deleted:,} older than 0s)" in out.stdout, out.stdout


def test_stats_samples_older_than_their_age_go(cluster: Cluster) -> None:
    """`tally serve retention` also deletes instance and router samples past
    --samples-older-than (7d: `tally stats` reads a week at most); newer ones stay."""
    import psycopg2

    from agents.stats import SampleStore

    app = "r" + uuid.uuid4().hex[:8]
    owner = cluster.dsn("tally_owner")
    with psycopg2.connect(owner) as conn, conn.cursor() as cur:
        for age in ("8 days", "6 days", "1 minute"):
            cur.execute("INSERT INTO stats.router_samples (app, balancer_id, requests, at) "
                        "VALUES (%s, 'b1', 1, now() - %s::interval)", (app, age))
            cur.execute("INSERT INTO stats.instance_samples (app, instance_id, host_id, at) "
                        "VALUES (%s, 'i1', 'h1', now() - %s::interval)", (app, age))
    gone = SampleStore(owner, "tally-retention-test").prune(timedelta(days=7), batch=1)
    assert gone["stats.router_samples"] >= 1 and gone["stats.instance_samples"] >= 1
    with psycopg2.connect(owner) as conn, conn.cursor() as cur:
        for table in ("stats.router_samples", "stats.instance_samples"):
            cur.execute(f"SELECT count(*), max(now() - at) < interval '7 days' FROM {table} "
                        "WHERE app = %s", (app,))
            assert cur.fetchone() == (2, True), table  # the 6-day-old and the fresh one
    bad = subprocess.run([sys.executable, "-m", "tally.cli", "serve", "retention",
                          "--samples-older-than", "a while"],
                         env=tally_env(cluster), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "must look like" in bad.stderr
