"""Reader stalls are bounded: the watchdog ends any session holding a transaction id past
its limit, whatever its role or database, and readers catch up."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psycopg2
import pytest

from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from tests.conftest import tally_env
from tests.waiting import wait_until

LIMIT = 2.0


@pytest.fixture
def watchdog(cluster: Cluster) -> Iterator[subprocess.Popen]:
    with open(cluster.root.parent / "watchdog.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tally.cli", "serve", "watchdog", "--limit", str(LIMIT)],
            env=tally_env(cluster), stdout=log, stderr=log)
    wait_until(lambda: looking(cluster), 30, "the watchdog never connected")
    yield proc
    proc.terminate()
    proc.wait(10)


def looking(cluster: Cluster) -> bool:
    """The watchdog is up: its session is on the primary."""
    conn = psycopg2.connect(cluster.dsn("postgres"))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = "
                        "'tally-watchdog' AND usename = 'postgres'")
            return cur.fetchone() is not None
    finally:
        conn.close()


class Holder(threading.Thread):
    """A session that takes a transaction id and then runs short statements back to back:
    no statement or idle-in-transaction timeout ever fires."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg2.connect(dsn, application_name="test-holder")
        self.took_xid = threading.Event()
        self.taken_at = 0.0
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            with self.conn.cursor() as cur:
                cur.execute("SELECT pg_current_xact_id()")
                self.taken_at = time.monotonic()
                self.took_xid.set()
                while True:
                    cur.execute("SELECT pg_sleep(0.2)")
        except psycopg2.Error:
            self.ended_at = time.monotonic()
        finally:
            self.conn.close()


def test_a_session_holding_an_xid_is_ended_and_readers_catch_up(
        cluster: Cluster, ledger: Ledger, watchdog: subprocess.Popen) -> None:
    holder = Holder(cluster.dsn("tally_writer"))
    holder.start()
    holder.took_xid.wait(10)
    appended = ledger.append("heartbeat-stalled", [NewEvent("HostHeartbeat",
                                                            {"host_id": "stalled"})])
    ledger.sequence()
    assert not ledger.positions_of(appended.event_ids), "not stalled: test proves nothing"

    wait_until(lambda: holder.ended_at is not None,
               LIMIT + 1 - (time.monotonic() - holder.taken_at),
               "the session holding an xid was not ended within the limit plus a second")
    wait_until(lambda: ledger.sequence() and ledger.positions_of(appended.event_ids), 10,
               "readers did not catch up")
    record = wait_until(lambda: [e for e in ledger.read_stream("ledger-watchdog")
                                 if e.data["application"] == "test-holder"], 10,
                        "no LedgerSessionTerminated recorded")[-1]
    assert record.type == "LedgerSessionTerminated"
    assert record.data["role"] == "tally_writer" and record.data["database"] == "tally"
    assert record.data["duration_s"] > LIMIT and "pg_sleep" in record.data["query"]


def test_a_superuser_session_in_another_database_is_ended(
        cluster: Cluster, watchdog: subprocess.Popen) -> None:
    holder = Holder(cluster.node_dsn(cluster.primary(), "postgres", dbname="postgres"))
    holder.start()
    holder.took_xid.wait(10)
    wait_until(lambda: holder.ended_at is not None,
               LIMIT + 1 - (time.monotonic() - holder.taken_at),
               "a superuser's session in another database was not ended in time")


@pytest.mark.parametrize("dbname", ["tally", "postgres"])
def test_the_reader_role_cannot_take_an_xid(cluster: Cluster, dbname: str) -> None:
    dsn = cluster.dsn("tally_reader").replace("dbname=tally", f"dbname={dbname}")
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for sql in ("SELECT pg_current_xact_id()", "SELECT txid_current()"):
                with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                    cur.execute(sql)
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                cur.execute("CREATE TABLE public.reader_wrote (x int)")
    finally:
        conn.close()
