"""The ledger under Patroni and etcd (real ones): failover without losing an acknowledged
append, rejoin by pg_rewind, no split brain, readers that follow the new leader.

One Patroni cluster for the module (bootstrapping one takes ~20 s); each test leaves it
with a leader and a streaming synchronous standby."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from ledger import Ledger, LedgerUnavailable, NewEvent
from ledger.patroni import PatroniCluster
from ledger.subscriber import Subscriber
from projectors.inspect import status as projector_status
from tests.conftest import RelayProcs, on_node, tally_env
from tests.patroni import destroy_patroni_cluster, healthy, make_patroni_cluster, members
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ha() -> Iterator[PatroniCluster]:
    cluster = make_patroni_cluster()
    yield cluster
    destroy_patroni_cluster(cluster)


class Writer(threading.Thread):
    """Appends with its own idempotency keys; a failed append is sent again with the same
    key until acknowledged. Remembers every acknowledged (key, event id)."""

    def __init__(self, dsn: str, n: int) -> None:
        super().__init__(daemon=True)
        self.ledger = Ledger(dsn, retry_deadline=90, confirm_timeout=5)
        self.n = n
        self.acked: dict[str, int] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            i = 0
            while not self.stop.is_set():
                i += 1
                key = f"ha-w{self.n}-{i}"
                while True:
                    try:
                        r = self.ledger.append(f"heartbeat-ha{self.n}", [NewEvent(
                            "HostHeartbeat", {"host_id": f"ha{self.n}", "instances": i})],
                            idempotency_key=key)
                        break
                    except LedgerUnavailable:  # OutcomeUnknown too: same key again
                        continue
                self.acked[key] = r.event_ids[0]
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            self.ledger.close()


def events_file(cluster: PatroniCluster, node: str) -> Path:
    (rel,), = on_node(cluster, node, "SELECT pg_relation_filepath('ledger.events')")
    return cluster.node_dir(node) / rel


@pytest.mark.parametrize("victim", ["postmaster", "patroni"])
def test_failover_under_writers_loses_no_acknowledged_append(
        ha: PatroniCluster, victim: str) -> None:
    old = healthy(ha)
    new = ha.other(old)
    relays = RelayProcs(ha)
    env = tally_env(ha, TALLY_RELAYS=",".join(relays.endpoints))
    logs = ha.root.parent
    with open(logs / "ha-watchdog.log", "ab") as wlog, \
         open(logs / "ha-projectors.log", "ab") as plog:
        watchdog = subprocess.Popen([sys.executable, "-m", "tally.cli", "serve", "watchdog"],
                                    env=env, stdout=wlog, stderr=wlog)
        projectors = subprocess.Popen([sys.executable, "-m", "tally.cli", "serve",
                                       "projectors"], env=env, stdout=plog, stderr=plog)
    writers = [Writer(ha.dsn(), n) for n in range(4)]
    sub = Subscriber(relays.endpoints)
    try:
        for i in range(2):
            relays.start(i)
            relays.wait_ready(i, timeout=60)
        for w in writers:
            w.start()
        wait_until(lambda: all(len(w.acked) >= 20 for w in writers), 60, "writers too slow")
        events = events_file(ha, old)
        inode = events.stat().st_ino
        before = {w.n: len(w.acked) for w in writers}

        if victim == "postmaster":
            os.kill(ha.postmaster_pid(old), signal.SIGKILL)
        else:
            # A dead Patroni: its leader key expires after ttl and the synchronous standby
            # takes over; the old PostgreSQL runs on, but its commits wait for a standby
            # that left, so none is acknowledged. A supervisor restarts Patroni, which
            # then demotes and rewinds its node.
            ha.ha.signal(f"patroni-{old}", signal.SIGKILL)
            wait_until(lambda: ha.ha.leader() == new, 90, "no failover from a dead Patroni")
            ha.start_node(old)
        wait_until(lambda: all(len(w.acked) >= before[w.n] + 20 for w in writers), 120,
                   "writes did not resume through the DSN")
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(120)
            assert w.error is None, w.error

        # Every acknowledged append exists exactly once on the leader (the key is unique).
        leader = healthy(ha)
        acked = {k: v for w in writers for k, v in w.acked.items()}
        rows = dict(on_node(ha, leader, "SELECT idempotency_key, id FROM ledger.events "
                            "WHERE stream LIKE 'heartbeat-ha%%'"))
        assert {k: rows.get(k) for k in acked} == acked

        # The old primary rejoined as the synchronous standby without a copy: its ledger
        # file is the same file (rewound in place when needed), and no reinit ran.
        assert members(ha)[old]["role"] == "sync_standby"
        log = (ha.root / f"patroni-{old}.log").read_text()
        assert leader == new and "reinitializ" not in log.lower()
        # (Patroni runs pg_rewind only when the timelines diverged: after some kills the
        # old primary had nothing past the fork point and just followed.)
        assert events.stat().st_ino == inode

        # Readers end with every event: the relays' wake-ups and the projectors.
        with Ledger(ha.dsn(), retry_deadline=60) as ledger:
            head = wait_until(lambda: ledger.sequence() if len(ledger.positions_of(
                list(acked.values()))) == len(acked) else None, 60, "events left unplaced")
            wait_until(lambda: sub.wait(0.5) is not None and sub.head >= head or
                       sub.head >= head, 60, "the relays did not follow the new leader")
            wait_until(lambda: all(p["position"] >= head for p in projector_status(
                ha.dsn("tally_reader"))), 90, "the projectors did not catch up")
            # Recorded once per timeline, when the new leader accepted writes.
            (timeline,), = on_node(ha, new, "SELECT timeline_id FROM pg_control_checkpoint()")
            changes = wait_until(lambda: [e.data for e in ledger.read_stream("ledger-leaders")
                                          if e.data["timeline"] >= timeline], 30,
                                 "no LedgerLeaderChanged for the new leader")
            assert changes == [{"leader": new, "previous": old, "timeline": timeline}]
            timelines = [e.data["timeline"] for e in ledger.read_stream("ledger-leaders")]
            assert len(timelines) == len(set(timelines))
    finally:
        sub.close()
        for w in writers:
            w.stop.set()
        relays.stop()
        for proc in (watchdog, projectors):
            proc.terminate()
            proc.wait(20)


def acked_on(cluster: PatroniCluster, node: str, key: str, timeout: float) -> bool:
    """Whether an append sent straight to `node` is acknowledged within `timeout` s."""
    dsn = cluster.node_dsn(node, "tally_writer")
    result: list[object] = []

    def attempt() -> None:
        try:
            with Ledger(dsn, retry_deadline=1, confirm_timeout=1) as ledger:
                ledger.append("heartbeat-split", [NewEvent("HostHeartbeat",
                                                           {"host_id": key})],
                              idempotency_key=key)
                result.append(True)
        except Exception as exc:  # noqa: BLE001 (read-only, unavailable, unknown: not acked)
            result.append(exc)
    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout)
    return result == [True]


def test_a_hung_leader_patroni_never_makes_two_writable_primaries(ha: PatroniCluster) -> None:
    old = healthy(ha)
    new = ha.other(old)
    ha.ha.signal(f"patroni-{old}", signal.SIGSTOP)
    try:
        wait_until(lambda: ha.ha.leader() == new, 90, "no failover from a hung Patroni")
        assert acked_on(ha, new, "split-new", 20)
        # The old primary's PostgreSQL still runs, but its commits wait for a standby
        # that is gone: never acknowledged.
        assert not acked_on(ha, old, "split-old", 5)
    finally:
        ha.ha.signal(f"patroni-{old}", signal.SIGCONT)
    healthy(ha)
    rows = on_node(ha, ha.ha.leader(), "SELECT idempotency_key FROM ledger.events "
                   "WHERE stream = 'heartbeat-split'")
    assert ("split-new",) in rows and ("split-old",) not in rows


def writable(cluster: PatroniCluster, node: str) -> bool:
    try:
        return not on_node(cluster, node, "SELECT pg_is_in_recovery()")[0][0]
    except psycopg2.Error:
        return False


def test_a_hung_etcd_leaves_no_writable_primary(ha: PatroniCluster) -> None:
    healthy(ha)
    ha.ha.signal("etcd", signal.SIGSTOP)
    try:
        # Without its store the leader demotes itself; nobody can take the lock.
        wait_until(lambda: not any(writable(ha, n) for n in ("a", "b")), 60,
                   "a primary kept accepting writes without etcd")
        assert not any(acked_on(ha, n, f"no-etcd-{n}", 3) for n in ("a", "b"))
    finally:
        ha.ha.signal("etcd", signal.SIGCONT)
    healthy(ha)
    with Ledger(ha.dsn(), retry_deadline=60) as ledger:
        ledger.append("heartbeat-split", [NewEvent("HostHeartbeat", {"host_id": "back"})])


def test_a_cut_replication_wait_then_a_crash_loses_no_acknowledged_append(
        ha: PatroniCluster) -> None:
    """The lost-ack sequence under Patroni: the standby stops receiving, an append waits,
    its wait is cancelled (OutcomeUnknown), the primary is killed -9. Whichever node leads
    after, the positions read before hold the same events, and the append is acknowledged
    only when sent again, once."""
    old = healthy(ha)
    standby = ha.other(old)
    with Ledger(ha.dsn(), retry_deadline=60) as ledger:
        ledger.append("heartbeat-cut", [NewEvent("HostHeartbeat", {"host_id": "before"})])
        wait_until(lambda: ledger.sequence() and ledger.positions_of(
            [ledger.read_stream("heartbeat-cut")[-1].id]),
                   30, "never sequenced")
        seen = [(e.position, e.id) for e in ledger.read_all(0, limit=100_000)]
    (receiver,), = on_node(ha, standby, "SELECT pid FROM pg_stat_wal_receiver")
    os.kill(receiver, signal.SIGSTOP)
    outcome: list[object] = []

    def append() -> None:
        try:
            with Ledger(ha.dsn(), retry_deadline=5, confirm_timeout=1) as ledger:
                ledger.stream_version("heartbeat-cut")
                outcome.append(ledger.append("heartbeat-cut", [NewEvent(
                    "HostHeartbeat", {"host_id": "cut"})], idempotency_key="cut-1"))
        except Exception as exc:  # noqa: BLE001 (the outcome is what the test checks)
            outcome.append(exc)
    t = threading.Thread(target=append, daemon=True)
    try:
        t.start()
        (pid,), = wait_until(lambda: on_node(ha, old, "SELECT pid FROM pg_stat_activity "
                                             "WHERE wait_event = 'SyncRep'"), 30,
                             "the append never waited for the standby")
        on_node(ha, old, "SELECT pg_cancel_backend(%s)", (pid,))
        t.join(30)
        assert outcome and isinstance(outcome[0], LedgerUnavailable), outcome  # unknown
        with Ledger(ha.dsn(), retry_deadline=5) as ledger:
            assert [(e.position, e.id) for e in ledger.read_all(0, limit=100_000)] == seen
        os.kill(ha.postmaster_pid(old), signal.SIGKILL)
    finally:
        os.kill(receiver, signal.SIGCONT)
    healthy(ha)
    with Ledger(ha.dsn(), retry_deadline=60) as ledger:
        again = ledger.append("heartbeat-cut", [NewEvent("HostHeartbeat", {"host_id": "cut"})],
                              idempotency_key="cut-1")
        wait_until(lambda: ledger.sequence() and ledger.positions_of(again.event_ids), 30,
                   "the confirmed append never got a position")
        after = [(e.position, e.id) for e in ledger.read_all(0, limit=100_000)]
    assert after[:len(seen)] == seen
    assert [e for e in after if e[1] == again.event_ids[0]] != []


def test_status_and_a_switchover_through_the_cli(ha: PatroniCluster) -> None:
    """`tally ledger status` shows Patroni's view; `tally ledger promote` is a switchover
    by Patroni, recorded as LedgerLeaderChanged once the new leader accepts writes."""
    old = healthy(ha)
    env = tally_env(ha)

    def tally(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tally.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)
    out = tally("ledger", "status").stdout
    assert f"leader {old} (timeline" in out and "sync_standby, streaming" in out
    with open(ha.root.parent / "ha-watchdog-2.log", "ab") as log:
        watchdog = subprocess.Popen([sys.executable, "-m", "tally.cli", "serve", "watchdog"],
                                    env=env, stdout=log, stderr=log)
    try:
        promoted = tally("ledger", "promote")
        new = ha.other(old)
        assert promoted.returncode == 0 and f"node {new}" in promoted.stderr, promoted.stderr
        assert healthy(ha) == new
        with Ledger(ha.dsn(), retry_deadline=60) as ledger:
            wait_until(lambda: [e for e in ledger.read_stream("ledger-leaders")
                                if e.data["leader"] == new and e.data["previous"] == old], 60,
                       "the switchover was not recorded")
    finally:
        watchdog.terminate()
        watchdog.wait(20)


def test_a_standby_that_was_not_synchronous_is_never_promoted(ha: PatroniCluster) -> None:
    """The standby goes down; Patroni stops waiting for it (not strict) and the primary
    acknowledges alone. The primary then dies whole (Patroni and postmaster): the stale
    standby, back, is not synchronous and must not lead. The old primary, back, leads with
    the append it acknowledged."""
    old = healthy(ha)
    stale = ha.other(old)
    ha.stop_node(stale)
    wait_until(lambda: on_node(ha, old, "SHOW synchronous_standby_names") == [("",)], 60,
               "Patroni never stopped waiting for the stopped standby")
    with Ledger(ha.dsn(), retry_deadline=30) as ledger:
        alone = ledger.append("heartbeat-alone", [NewEvent("HostHeartbeat", {"host_id": "x"})])
    ha.stop_node(old, mode="immediate")
    log = ha.root / f"patroni-{stale}.log"
    seen = log.stat().st_size
    ha.start_node(stale)
    try:
        wait_until(lambda: "not the healthiest node" in log.read_text()[seen:], 90,
                   "the stale standby never tried (and failed) to lead")
        assert ha.ha.leader() is None
    finally:
        ha.start_node(old)
    assert healthy(ha) == old
    rows = on_node(ha, old, "SELECT id FROM ledger.events WHERE stream = 'heartbeat-alone'")
    assert (alone.event_ids[0],) in rows


def test_an_app_cannot_write_the_leader_key(ha: PatroniCluster) -> None:
    """etcd checks passwords: a process of an app's uid on this machine reaches etcd's port
    but may neither write nor read Patroni's keys, nor read the passwords or list the
    cluster's folder."""
    leader = healthy(ha)
    key = base64.b64encode(f"/tally/{ha.scope}/leader".encode()).decode()
    url = ha.ha.spec.etcd_url
    script = (
        "import json, sys, urllib.request, urllib.error\n"
        "def call(path, body):\n"
        "    req = urllib.request.Request(sys.argv[1] + '/v3/' + path,\n"
        "                                 data=json.dumps(body).encode(), method='POST')\n"
        "    try:\n"
        "        return urllib.request.urlopen(req, timeout=5).read().decode()\n"
        "    except urllib.error.HTTPError as exc:\n"
        "        return exc.read().decode()\n"
        "print(call('kv/put', {'key': sys.argv[2], 'value': 'ZXZpbA=='}))\n"
        "print(call('kv/deleterange', {'key': sys.argv[2]}))\n"
        "print(call('kv/range', {'key': sys.argv[2]}))\n"
        "print(call('auth/authenticate', {'name': 'root', 'password': ''}))\n"
        "import os\n"
        "for path in (sys.argv[3], os.path.dirname(sys.argv[3])):\n"
        "    try:\n"
        "        open(path).read() if path == sys.argv[3] else os.listdir(path)\n"
        "        print('read', path)\n"
        "    except OSError as exc:\n"
        "        print('refused:', exc.strerror)\n"
    )
    uid = 299_998  # an app's uid as agents/users.py hands them out: no user, no group
    out = subprocess.run(["/usr/bin/python3", "-c", script, url, key,
                          str(ha.credentials_file)], user=uid, group=uid, cwd="/",
                         capture_output=True, text=True, timeout=30, check=True).stdout
    lines = out.splitlines()
    assert len(lines) == 6, out
    for answer in lines[:3]:  # put, delete, read: refused without a user
        assert "user name is empty" in answer, out
    assert "authentication failed" in lines[3]
    assert lines[4:] == ["refused: Permission denied"] * 2  # the passwords, the folder
    # Patroni (its own user) still holds the key, unchanged.
    token = ha.ha.etcd_call("auth/authenticate", {"name": "tally",
                                                  "password": ha.credentials()["etcd_tally"]})
    kvs = ha.ha.etcd_call("kv/range", {"key": key}, token["token"])["kvs"]
    assert base64.b64decode(kvs[0]["value"]).decode() == leader
    assert ha.ha.leader() == leader


def rewind_report(log: str) -> tuple[int, int]:
    """(kB copied, MB in the source directory) from the last pg_rewind Patroni logged."""
    copied = re.findall(r"(\d+)/(\d+) kB \(100%\) copied", log)
    total = re.findall(r"total source directory size is (\d+) MB", log)
    assert copied and total, "pg_rewind reported no progress"
    return int(copied[-1][0]), int(total[-1])


def test_a_rejoin_rewinds_what_diverged_not_the_whole_ledger(ha: PatroniCluster) -> None:
    """A primary killed with WAL its standby never received has diverged; Patroni rejoins
    it by pg_rewind, not by a copy. Measured in bytes from pg_rewind's own report: it copies
    the new leader's WAL folder whole (PostgreSQL 15's pg_rewind does; kept to wal_keep_size
    and the last checkpoints, whatever the ledger's size) and, of the data files, only what
    changed: far less than a ledger of ~100 MB."""
    old = healthy(ha)
    standby = ha.other(old)
    on_node(ha, old, "INSERT INTO ledger.events (stream, category, version, type, data) "
            "SELECT 'heartbeat-bulk' || (g / 1000), 'heartbeat', g %% 1000 + 1, "
            "'HostHeartbeat', jsonb_build_object('host_id', 'bulk-' || repeat('x', 500)) "
            "FROM generate_series(0, 149999) g")
    (ledger_bytes,), = on_node(ha, old, "SELECT pg_total_relation_size('ledger.events')")
    assert ledger_bytes > 64 * 2**20
    on_node(ha, old, "CHECKPOINT")
    wait_until(lambda: on_node(ha, standby, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                               (on_node(ha, old, "SELECT pg_current_wal_lsn()::text")[0][0],)
                               )[0][0], 120, "the standby never caught up")
    # Stopped on the primary's side: WAL already sent could still reach the standby.
    (sender,), = on_node(ha, old, "SELECT pid FROM pg_stat_replication")
    log = ha.root / f"patroni-{old}.log"
    seen = log.stat().st_size
    os.kill(sender, signal.SIGSTOP)
    try:
        # A commit the standby never receives: the primary has WAL past the fork point.
        conn = psycopg2.connect(ha.node_dsn(old, "tally_writer"))
        conn.autocommit = True
        conn.cursor().execute("SET synchronous_commit = local")
        conn.cursor().execute("INSERT INTO ledger.events (stream, category, version, type, "
                              "data) VALUES ('heartbeat-diverged', 'heartbeat', 1, "
                              "'HostHeartbeat', '{\"host_id\": \"diverged\"}')")
        conn.close()
        os.kill(ha.postmaster_pid(old), signal.SIGKILL)
    finally:
        os.kill(sender, signal.SIGKILL)
    wait_until(lambda: ha.ha.leader() == standby, 90, "the standby never took over")
    wait_until(lambda: members(ha)[old]["role"] == "sync_standby", 180,
               "the old primary never rejoined as the synchronous standby")
    text = log.read_text()[seen:]
    assert "pg_rewind exit code=0" in text and "reinitializ" not in text.lower(), text[-3000:]
    copied_kb, source_mb = rewind_report(text)
    (wal_bytes,), = on_node(ha, standby, "SELECT sum(size) FROM pg_ls_waldir()")
    print(f"pg_rewind copied {copied_kb / 1024:.1f} MB of {source_mb} MB; the new leader's "
          f"WAL folder {wal_bytes / 2**20:.1f} MB; the ledger {ledger_bytes / 2**20:.1f} MB")
    assert copied_kb * 1024 - wal_bytes < ledger_bytes / 4
