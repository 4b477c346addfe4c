"""The backup agent against a real ledger cluster that archives its WAL: real
pg_basebackup, pg_verifybackup, scratch servers, restores, APScheduler in real
`tally serve backups` processes, and kill -9."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import requests

import migrations
from agents.addons import create_database, drop_database, ensure_cluster
from agents.backups import gfs
from agents.backups.jobs import LEDGER, BackupAgent
from agents.backups.repository import SPOOL, Repository, archive_command
from agents.backups.restore import Target, restore
from agents.backups.state import TYPES, Backup, fold
from ledger import Ledger, NewEvent, digest
from ledger.cluster import Cluster, ClusterSpec
from tally.config import Config
from tests.conftest import destroy_cluster, free_port_range, free_ports, tally_env
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def archived() -> Iterator[Cluster]:
    """A cluster of this module's own whose primary archives into TALLY_HOME's spool."""
    home = Path(tempfile.mkdtemp(prefix="tally-test-"))
    home.chmod(0o755)
    root = home / "ledger"
    cluster = Cluster(ClusterSpec(root, ports=tuple(free_ports(2)),  # type: ignore[arg-type]
                                  archive_command=archive_command(root / "run" / SPOOL)))
    cluster.init()
    migrations.upgrade(cluster.dsn("tally_owner"))
    yield cluster
    destroy_cluster(cluster)


@pytest.fixture(scope="module")
def apps(archived: Cluster) -> Iterator[Cluster]:
    """The platform's apps' cluster (TALLY_HOME/appsdb, plain: a primary and a standby),
    made as `tally` makes it, for every test here that dumps and restores an app's
    database; each test drops the databases it made."""
    a, b, proxy = free_ports(3)
    env = tally_env(archived, TALLY_APPS_DB_PORTS=f"{a},{b}", TALLY_APPS_DB_PORT=str(proxy),
                    TALLY_APPS_HA="plain")
    cluster = Config.from_env(env).apps_cluster()
    try:
        ensure_cluster(cluster)
        yield cluster
    finally:
        cluster.destroy()


def apps_env(archived: Cluster, apps: Cluster, **extra: str) -> dict[str, str]:
    """A `tally` environment that finds `apps` as the platform's apps' cluster."""
    return tally_env(archived, TALLY_APPS_DB_PORTS=",".join(str(p) for p in apps.spec.ports),
                     TALLY_APPS_HA="plain", **extra)


@contextmanager
def app_database(apps: Cluster, app: str) -> Iterator[str]:
    """The app's database in `apps` (its DATABASE_URL), dropped afterwards."""
    try:
        yield create_database(apps, app)
    finally:
        drop_database(apps, app)


def home(cluster: Cluster) -> Path:
    return cluster.root.parent


def agent_of(cluster: Cluster, policy: gfs.Policy | None = None) -> BackupAgent:
    return BackupAgent(cluster, Repository(home(cluster) / "backups").open(),
                       home(cluster) / "backup-scratch", policy or gfs.Policy())


def backups(cluster: Cluster) -> dict[str, Backup]:
    with Ledger(cluster.dsn()) as ledger:
        ledger.sequence()
        return fold(ledger.read_all(types=TYPES, limit=None))


def append_apps(cluster: Cluster, prefix: str, n: int) -> int:
    with Ledger(cluster.dsn()) as ledger:
        for i in range(n):
            ledger.append(f"app-{prefix}{i}", [NewEvent("AppCreated", {
                "name": f"{prefix}{i}", "owner": "ann"})])
        return ledger.sequence()


def archive_now(cluster: Cluster, agent: BackupAgent) -> None:
    """Close the current WAL segment and move what the primary archived into the
    repository (the daemon does this every second)."""
    conn = psycopg2.connect(cluster.node_dsn(cluster.primary(), "postgres", "postgres"))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_walfile_name(pg_switch_wal())")
        segment = cur.fetchone()[0]
    conn.close()
    wal = agent.repo.wal_dir / segment
    spool = home(cluster) / "ledger" / "run" / SPOOL
    wait_until(lambda: agent.repo.ingest_wal(spool) is not None and wal.exists(), 60,
               f"{segment} never archived")


def live_digest(cluster: Cluster, position: int) -> digest.Digest:
    with closing(psycopg2.connect(cluster.dsn("tally_reader"))) as conn:
        return digest.digest(conn, position)


def clock_now(cluster: Cluster) -> datetime:
    """The ledger server's clock (recovery targets are compared with commit times)."""
    with closing(psycopg2.connect(cluster.dsn("tally_reader"))) as conn, \
            conn.cursor() as cur:
        cur.execute("SELECT clock_timestamp()")
        return cur.fetchone()[0]


def test_a_backup_is_verified_and_restores_to_its_position_and_to_a_time(
        archived: Cluster) -> None:
    agent = agent_of(archived)
    append_apps(archived, "before", 30)
    backup_id = agent.run_ledger(None, job="capture", reason="capture")
    assert backup_id is not None
    b = backups(archived)[backup_id]
    assert b.state == "verified", b.failed
    position = b.verified["position"]
    assert b.verified["events"] == live_digest(archived, position).events >= 30
    assert b.completed["size_bytes"] > 0 and b.completed["start_lsn"]

    append_apps(archived, "between", 10)
    between = clock_now(archived)
    head_between = append_apps(archived, "after", 0)
    append_apps(archived, "after", 10)
    archive_now(archived, agent)

    # to the backup's position: exactly the events up to it
    at_backup = restore(agent.repo, home(archived) / "at-backup", Target(position=position),
                        archived, check=True)
    expected = live_digest(archived, position)
    assert (at_backup.position, at_backup.events, at_backup.digest) == \
        (position, expected.events, expected.sha256)

    # to a time between: what was committed by then, nothing after
    at_time = restore(agent.repo, home(archived) / "at-time", Target(time=between), archived,
                      check=True)
    expected = live_digest(archived, head_between)
    assert (at_time.position, at_time.events, at_time.digest) == \
        (head_between, expected.events, expected.sha256)
    assert at_time.position > position

    # without --check: the folder and its head, no full read of the events
    plain = restore(agent.repo, home(archived) / "at-end", Target(), archived)
    assert plain.position >= head_between and (plain.events, plain.digest) == (None, None)


def test_a_corrupted_backup_fails_verification_and_never_counts(archived: Cluster) -> None:
    agent = agent_of(archived, gfs.Policy(hourly=1, daily=0, weekly=0, monthly=0))
    good = agent.run_ledger(None, job="capture", reason="capture")
    assert good is not None and backups(archived)[good].state == "verified"

    from agents.backups import base

    with agent.ledger() as ledger:
        bad = "ledger-corrupted"
        assert agent.claim(ledger, LEDGER, bad, "capture", None, "test")
        taken = base.take(archived, agent.repo, bad, ledger.sequence())
        agent.record(ledger, LEDGER, "BackupCompleted", backup_id=bad,
                     size_bytes=taken.size_bytes, location=taken.location,
                     digest=taken.manifest_sha256, timeline=taken.timeline,
                     start_lsn=taken.start_lsn, end_lsn=taken.end_lsn)
        victim = next(p for p in sorted((agent.repo.base(bad) / "base").rglob("*"))
                      if p.is_file() and p.stat().st_size > 8192)
        with open(victim, "r+b") as f:  # one flipped byte in a table's file
            f.seek(4096)
            byte = f.read(1)
            f.seek(4096)
            f.write(bytes([byte[0] ^ 0xFF]))
        assert not agent.verify_ledger(ledger, bad, {})
        agent.prune(ledger, LEDGER)
    state = backups(archived)
    assert state[bad].state == "failed" and "pg_verifybackup" in state[bad].failed
    assert not agent.repo.base(bad).exists()
    assert state[good].state == "verified", "a failed backup made retention prune a good one"

    from projectors import backups as view

    tables = view.PROJECTOR.new_tables()
    with Ledger(archived.dsn()) as ledger:
        view.PROJECTOR.apply(tables, ledger.read_all(types=TYPES, limit=None))
    row = tables.get("backups", "ledger")
    assert row is not None
    assert row["last_ok_backup_id"] != bad and row["last_failure_backup_id"] == bad
    assert bad not in [r["backup_id"] for r in row["retained"]]


def as_postgres(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                           *cmd], capture_output=True, text=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as the postgres user")
def test_the_repository_is_closed_to_the_database_servers_and_apps(archived: Cluster) -> None:
    agent = agent_of(archived)
    if not any(agent.repo.base_dir.iterdir()):
        assert agent.run_ledger(None, job="capture", reason="capture")
    held = next(p for p in agent.repo.base_dir.iterdir() if p.is_dir())
    archive_now(archived, agent)
    wal = agent.repo.wal_segments()[-1]
    for cmd in (["touch", str(agent.repo.root / "planted")],
                ["touch", str(agent.repo.wal_dir / "000000010000000000000099")],
                ["rm", "-rf", str(held)], ["rm", "-f", str(agent.repo.wal_dir / wal)],
                ["ls", str(agent.repo.root)], ["cat", str(held / "backup_manifest")]):
        assert as_postgres(*cmd).returncode != 0, f"postgres could {cmd}"
        nobody = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup",
                                 "--clear-groups", *cmd], capture_output=True)
        assert nobody.returncode != 0, f"an app's user could {cmd}"
    assert held.exists() and (agent.repo.wal_dir / wal).exists()
    # A link planted in the servers' spool, named as a segment, is not followed by root.
    spool = home(archived) / "ledger" / "run" / SPOOL
    planted = "0000000100000000000000FE"
    assert as_postgres("ln", "-s", str(held / "backup_manifest"),
                       str(spool / planted)).returncode == 0
    assert planted not in agent.repo.ingest_wal(spool)
    assert not (agent.repo.wal_dir / planted).exists() and not (spool / planted).exists()
    assert (agent.repo.root.stat().st_uid, agent.repo.root.stat().st_mode & 0o777) == (0, 0o700)


def tally(cluster: Cluster, *args: str) -> subprocess.Popen:
    with open(home(cluster) / f"tally-{args[0]}-{os.getpid()}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "tally.cli", *args],
                                env=tally_env(cluster), stdout=log, stderr=log,
                                start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def api_call(api_url: str, token: str, method: str, path: str,
             **kw: Any) -> requests.Response:
    return requests.request(method, api_url + path, timeout=300,
                            headers={"Authorization": f"Bearer {token}"}, **kw)


def laptop(here: Path, api_url: str, token: str) -> Callable[..., subprocess.CompletedProcess]:
    """`tally` as an app's member runs it: from their own folder (not TALLY_HOME: its
    `ledger/` would shadow ours), knowing only the API's address and their token."""
    here.mkdir(exist_ok=True)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TALLY_")},
           "TALLY_API": api_url, "TALLY_TOKEN": token}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tally.cli", *args], env=env,
                              capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL, cwd=here)
    return run


def killed_mid_backup(archived: Cluster, proc: subprocess.Popen,
                      picked: Callable[[Backup], bool]) -> str:
    """Once `proc` (a `tally` process) has started the backup `picked` chooses and its
    pg_basebackup has written, kill -9 it and its pg_basebackup; the backup's id (recorded
    as still running)."""
    repo = Repository(home(archived) / "backups").open()
    try:
        started = wait_until(lambda: [b for b in backups(archived).values() if picked(b)], 120,
                             "the backup never started")
        backup_id = started[0].backup_id
        wait_until(lambda: repo.partial(backup_id).exists() and any(
            repo.partial(backup_id).rglob("*")), 60, "pg_basebackup never wrote")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        stop(proc)
    assert backups(archived)[backup_id].state == "running"
    return backup_id


def settled(archived: Cluster, backup_id: str) -> Backup:
    """The backup whose agent was killed, once a daemon has recorded it failed and removed
    its partial copy."""
    orphan = wait_until(lambda: backups(archived)[backup_id].finished
                        and backups(archived)[backup_id], 120, "the orphan was not settled")
    assert orphan.state == "failed" and "stopped during the backup" in orphan.failed
    assert not Repository(home(archived) / "backups").partial(backup_id).exists()
    return orphan


def test_an_agent_killed_mid_backup_never_leaves_a_half_backup_counted_good(
        archived: Cluster) -> None:
    repo = Repository(home(archived) / "backups").open()
    before = set(backups(archived))
    capture = tally(archived, "backups:capture", "--max-rate", "1M")
    backup_id = killed_mid_backup(archived, capture, lambda b: b.backup_id not in before)

    # A daemon comes up: it settles the orphan, then runs the job that was due meanwhile
    # (its cron fired on Jan 1st and no run was ever claimed for it) once.
    daemon = tally(archived, "serve", "backups", "--ledger", "0 0 1 1 *",
                   "--addons", "0 0 1 1 *")
    try:
        settled(archived, backup_id)
        assert not repo.base(backup_id).exists()
        year = datetime.now(UTC).year
        due = f"{year}-01-01T00:00:00+00:00"
        caught_up = wait_until(
            lambda: [b for b in backups(archived).values() if b.scheduled_for == due
                     and b.finished], 300, "the run due while no agent ran never ran")
        assert [b.state for b in caught_up] == ["verified"], caught_up[0].failed
    finally:
        stop(daemon)
    # Started again, it does not run that job again.
    daemon = tally(archived, "serve", "backups", "--ledger", "0 0 1 1 *",
                   "--addons", "0 0 1 1 *")
    try:
        wait_until(lambda: _log(archived).count(READY) >= 2, 60,
                   "the second daemon never finished its start")
    finally:
        stop(daemon)
    assert len([b for b in backups(archived).values() if b.scheduled_for == due]) == 1


READY = "backup agent ready"


def _log(cluster: Cluster) -> str:
    return "".join(p.read_text(errors="replace") for p in home(cluster).glob("tally-serve-*"))


def test_two_agents_run_each_scheduled_job_once(archived: Cluster) -> None:
    args = ("serve", "backups", "--ledger", "*/20 * * * * *", "--addons", "0 0 1 1 *")
    agents = [tally(archived, *args), tally(archived, *args)]
    try:
        def scheduled() -> list[Backup]:  # the */20 s runs, not the catch-up of Jan 1st
            return [b for b in backups(archived).values()
                    if b.job == LEDGER and b.scheduled_for
                    and not b.scheduled_for.endswith("-01-01T00:00:00+00:00")]

        wait_until(lambda: len({b.scheduled_for for b in scheduled()
                                if b.state == "verified"}) >= 2, 300,
                   "two scheduled runs never both verified")
    finally:
        for proc in agents:
            stop(proc)
    runs = scheduled()
    times = [b.scheduled_for for b in runs]
    assert len(times) == len(set(times)), f"a scheduled run ran twice: {sorted(times)}"
    assert all(b.state in ("verified", "pruned") for b in runs if b.finished), \
        [(b.backup_id, b.failed) for b in runs]
    assert len({b.agent.partition("/")[0] for b in runs}) >= 1
    # No terminal watches a scheduled run: its progress goes to the agent's log.
    ids = "|".join(b.backup_id for b in runs if b.state == "verified")
    assert re.search(rf"({ids}): base backup: \d+% \([\d.]+ of [\d.]+ MB, ", _log(archived))


@pytest.mark.slow
def test_a_ledger_under_patroni_archives_and_its_backups_verify_and_restore() -> None:
    """Under Patroni the archive settings are each node's own postgresql parameters (in
    Patroni's config), and a base backup of the leader (Patroni's configuration files
    inside it) starts on a scratch port."""
    from ledger.patroni import PatroniCluster

    home_dir = Path(tempfile.mkdtemp(prefix="tally-test-"))
    home_dir.chmod(0o755)
    root = home_dir / "ledger"
    a, b, *others = free_ports(6)
    cluster = PatroniCluster(ClusterSpec(root, ports=(a, b),
                                         archive_command=archive_command(root / "run" / SPOOL)),
                             tuple(others))  # type: ignore[arg-type]
    try:
        cluster.init()
        migrations.upgrade(cluster.dsn("tally_owner"))
        config = (root / "run" / "patroni-a.yml").read_text()
        assert '"archive_mode": "on"' in config and SPOOL in config
        agent = agent_of(cluster)
        append_apps(cluster, "ha", 5)
        backup_id = agent.run_ledger(None, job="capture", reason="capture")
        b = backups(cluster)[backup_id]  # type: ignore[index]
        assert b.state == "verified", b.failed
        head = append_apps(cluster, "later", 5)
        archive_now(cluster, agent)
        restored = restore(agent.repo, home_dir / "restored", Target(position=head), cluster,
                           check=True)
        expected = live_digest(cluster, head)
        assert (restored.position, restored.events, restored.digest) == \
            (head, expected.events, expected.sha256)
    finally:
        cluster.destroy()
        subprocess.run(["rm", "-rf", str(home_dir)], check=False)


def test_an_app_database_is_dumped_verified_and_restored_after_a_table_is_dropped(
        archived: Cluster, apps: Cluster) -> None:
    with app_database(apps, "shop") as url:
        with closing(psycopg2.connect(url)) as app_conn:  # the app itself
            app_conn.autocommit = True
            with app_conn.cursor() as cur:
                cur.execute("CREATE TABLE orders (id int PRIMARY KEY, item text)")
                cur.execute("INSERT INTO orders VALUES (1, 'tea'), (2, 'cake')")
        agent = BackupAgent(archived, Repository(home(archived) / "backups").open(),
                            home(archived) / "backup-scratch", gfs.Policy(), apps_cluster=apps)
        assert agent.addon_apps() == ["shop"]
        (backup_id,) = agent.run_addons(None, job="capture")
        b = backups(archived)[backup_id]
        assert (b.target, b.state) == ("addon:shop", "verified"), b.failed
        assert agent.repo.dump("shop", backup_id).stat().st_size == b.completed["size_bytes"]

        with closing(psycopg2.connect(url)) as app_conn:
            app_conn.autocommit = True
            with app_conn.cursor() as cur:
                cur.execute("DROP TABLE orders")
        restored = subprocess.run(
            [sys.executable, "-m", "tally.cli", "backups:restore-addon", "shop", "--confirm",
             "shop"], env=apps_env(archived, apps), capture_output=True, text=True, timeout=120)
        assert restored.returncode == 0, restored.stderr
        assert backup_id in restored.stderr
        with closing(psycopg2.connect(url)) as app_conn, app_conn.cursor() as cur:
            cur.execute("SELECT item FROM orders ORDER BY id")
            assert [r[0] for r in cur.fetchall()] == ["tea", "cake"]
            cur.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'orders'")
            assert cur.fetchone()[0] == "app_shop"
        refused = subprocess.run(
            [sys.executable, "-m", "tally.cli", "backups:restore-addon", "shop"],
            env=tally_env(archived), capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL)
        assert refused.returncode == 1 and "--confirm shop" in refused.stderr


def test_an_apps_people_back_up_and_restore_its_database_through_the_api_and_no_one_else(
        archived: Cluster, apps: Cluster) -> None:
    from api.auth import create_user
    from tests.api_process import ApiProcess
    from tests.fixtures.apps.fleet import create_app, release

    port = free_ports(1)[0]
    api = ApiProcess(apps_env(archived, apps), port)
    try:
        api.wait_ready()
        with Ledger(archived.dsn()) as ledger:
            ann = create_user(ledger, "ann", "member")  # create_app's owner
            bob = create_user(ledger, "bob", "member")  # another app's member
            create_app(ledger, "cafe")
            release(ledger, home(archived), "cafe", "hello", 1)

        call = partial(api_call, api.url)

        assert call(ann, "POST", "/apps/cafe/addons", json={"kind": "postgresql"}) \
            .status_code == 201
        url = call(ann, "GET", "/apps/cafe/config").json()["config"]["DATABASE_URL"]
        with closing(psycopg2.connect(url)) as app_conn:  # the app itself
            app_conn.autocommit = True
            with app_conn.cursor() as cur:
                cur.execute("CREATE TABLE menu (item text)")
                cur.execute("INSERT INTO menu VALUES ('tea')")

        here = home(archived) / "laptop"
        tally_cli = laptop(here, api.url, ann)

        captured = tally_cli("pg:backups:capture", "-a", "cafe")
        assert captured.returncode == 0, captured.stderr
        backup_id = captured.stdout.strip()
        listed = tally_cli("pg:backups", "-a", "cafe", "--json")
        assert [(x["backup_id"], x["state"]) for x in json.loads(listed.stdout)] == \
            [(backup_id, "verified")]

        with closing(psycopg2.connect(url)) as app_conn:
            app_conn.autocommit = True
            with app_conn.cursor() as cur:
                cur.execute("DROP TABLE menu")

        # Someone who is not the app's: nothing to list, fetch or restore.
        base_path = f"/apps/cafe/backups/{backup_id}"
        for method, path, body in (("GET", "/apps/cafe/backups", None),
                                   ("GET", f"{base_path}/download", None),
                                   ("POST", f"{base_path}/restore", {"confirm": "cafe"}),
                                   ("POST", "/apps/cafe/backups", None)):
            r = call(bob, method, path, json=body)
            assert r.status_code == 403, (path, r.status_code, r.text)

        assert call(ann, "POST", f"{base_path}/restore", json={"confirm": "caf"}) \
            .status_code == 422
        refused = tally_cli("pg:backups:restore", "-a", "cafe", backup_id)
        assert refused.returncode == 1 and "--confirm cafe" in refused.stderr
        downloaded = tally_cli("pg:backups:download", "-a", "cafe", "-o", "cafe.dump")
        assert downloaded.returncode == 0, downloaded.stderr
        assert (here / "cafe.dump").read_bytes()[:5] == b"PGDMP"
        restored = tally_cli("pg:backups:restore", "-a", "cafe", "--confirm", "cafe")
        assert restored.returncode == 0, restored.stderr
        with closing(psycopg2.connect(url)) as app_conn, app_conn.cursor() as cur:
            cur.execute("SELECT item FROM menu")
            assert cur.fetchall() == [("tea",)]

        # Destroying the add-on takes a final backup first.
        assert call(ann, "DELETE", "/apps/cafe/addons/postgresql-cafe").status_code == 200
        final = [x for x in call(ann, "GET", "/apps/cafe/backups").json()["backups"]
                 if x["job"] == "final"]
        assert [x["state"] for x in final] == ["verified"]
        assert Repository(home(archived) / "backups").dump("cafe", final[0]["backup_id"]) \
            .stat().st_size > 0
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(url).close()
        # Kept for the operator's period, then pruned with the add-on's other backups.
        agent = agent_of(archived)
        assert agent.prune_finals(datetime.now(UTC)) == []
        agent.keep_final = timedelta(0)
        assert set(agent.prune_finals(datetime.now(UTC))) == {backup_id, final[0]["backup_id"]}
        assert not agent.repo.dump("cafe", final[0]["backup_id"]).exists()
    finally:
        api.stop()
        drop_database(apps, "cafe")


def test_a_restore_never_lends_the_superuser_to_the_tenants_code(
        archived: Cluster, apps: Cluster) -> None:
    """The tenant's functions run during a restore (here a CHECK on its rows): one that
    tries `RESET ROLE` to act as whoever logged in must find no superuser there."""
    with app_database(apps, "evil") as url:
        with closing(psycopg2.connect(url)) as app_conn:
            app_conn.autocommit = True
            with app_conn.cursor() as cur:
                cur.execute("""CREATE FUNCTION ok(int) RETURNS bool LANGUAGE plpgsql AS $$
                    BEGIN
                      IF current_user <> session_user THEN
                        RESET ROLE;
                        BEGIN
                          EXECUTE 'ALTER ROLE app_evil SUPERUSER';
                        EXCEPTION WHEN insufficient_privilege THEN NULL;
                        END;
                      END IF;
                      RETURN true;
                    END $$""")
                cur.execute("CREATE TABLE t (x int CHECK (ok(x)))")
                cur.execute("INSERT INTO t VALUES (1)")
        agent = BackupAgent(archived, Repository(home(archived) / "backups-evil").open(),
                            home(archived) / "backup-scratch-evil", gfs.Policy(),
                            apps_cluster=apps)
        backup_id = agent.run_addon("evil", job="capture")
        assert backups(archived)[backup_id].state == "verified"
        from agents.backups import dumps
        dumps.restore_dump(apps, "evil", agent.repo.dump("evil", backup_id))
        with closing(psycopg2.connect(url)) as app_conn, app_conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM t")
            assert cur.fetchone()[0] == 1
        with closing(psycopg2.connect(apps.node_dsn(apps.primary(), "postgres", "postgres"))
                     ) as conn, conn.cursor() as cur:
            cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'app_evil'")
            assert cur.fetchone()[0] is False
            cur.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'tally_restore_%'")
            assert cur.fetchone()[0] == 0  # the restore's own role is gone


def test_the_daemon_killed_mid_backup_records_the_failure_and_its_next_run_succeeds(
        archived: Cluster) -> None:
    # A daily run that fired a moment ago, after every run claimed so far: due at start.
    fired = (datetime.now(UTC) - timedelta(seconds=1)).replace(microsecond=0)
    due = fired.isoformat()
    daily = f"{fired.second} {fired.minute} {fired.hour} * * *"
    daemon = tally(archived, "serve", "backups", "--ledger", daily, "--addons",
                   "0 0 1 1 *", "--max-rate", "1M")
    backup_id = killed_mid_backup(archived, daemon, lambda b: b.scheduled_for == due)

    daemon = tally(archived, "serve", "backups", "--ledger", "*/15 * * * * *", "--addons",
                   "0 0 1 1 *")
    try:
        orphan = settled(archived, backup_id)
        after = wait_until(lambda: [b for b in backups(archived).values()
                                    if b.job == LEDGER and b.started_at > orphan.started_at
                                    and b.scheduled_for != due and b.state == "verified"],
                           300, "no later scheduled run succeeded")
        assert after
    finally:
        stop(daemon)
    assert len([b for b in backups(archived).values() if b.scheduled_for == due]) == 1


def test_an_app_dump_that_lists_but_does_not_restore_is_never_counted(
        archived: Cluster, apps: Cluster) -> None:
    """pg_restore --list reads any whole file; only a restore shows the dump is usable.
    Here a CHECK that refuses rows while restoring: the dump lists, its scratch restore
    fails, and the backup is recorded as failed, never good."""
    with app_database(apps, "brittle") as url:
        with closing(psycopg2.connect(url)) as app_conn:
            app_conn.autocommit = True
            with app_conn.cursor() as cur:
                cur.execute("""CREATE FUNCTION live(int) RETURNS bool LANGUAGE sql
                               AS $$ SELECT current_user = session_user $$""")
                cur.execute("CREATE TABLE t (x int CHECK (live(x)))")
                cur.execute("INSERT INTO t VALUES (1)")
        agent = BackupAgent(archived, Repository(home(archived) / "backups-norestore").open(),
                            home(archived) / "backup-scratch-norestore", gfs.Policy(),
                            apps_cluster=apps)
        backup_id = agent.run_addon("brittle", job="capture")
        b = backups(archived)[backup_id]
        assert b.state == "failed", b
        assert "pg_restore" in b.failed and "check constraint" in b.failed, b.failed


def test_an_apps_redis_is_copied_as_an_rdb_checked_and_kept(archived: Cluster) -> None:
    """Each Redis add-on's RDB is copied (redis-cli --rdb as its backup user, which may do
    nothing else), checked by redis-check-rdb, loaded by a scratch server and recorded
    like a dump."""
    import redis as redis_client

    from agents import redisaddon

    root = home(archived) / "redis-backed"
    low, _ = free_port_range(10)
    url, _ = redisaddon.create(root, "cache", "cache", (low, low + 9))
    try:
        client = redis_client.Redis.from_url(url)
        client.set("greeting", "bonjour")
        agent = BackupAgent(archived, Repository(home(archived) / "backups-redis").open(),
                            home(archived) / "backup-scratch-redis", gfs.Policy(),
                            redis_dir=root)
        (backup_id,) = agent.run_addons(None, job="capture")
        b = backups(archived)[backup_id]
        assert (b.target, b.state) == ("redis:cache", "verified"), b.failed
        assert b.verified["events"] == 1, "loaded by a scratch server: its one key"
        rdb = agent.repo.rdb("cache", backup_id)
        assert rdb.stat().st_size == b.completed["size_bytes"]
        assert b"greeting" in rdb.read_bytes()
        assert not redisaddon.checks(root), "the scratch server's folder is gone"
        # A restore killed after moving the data aside, before putting the RDB in place:
        # settled (the old data back, the marker gone), the server starts with it.
        redisaddon.stop(root, "cache")
        (root / ".restoring-cache").touch()
        (root / "cache" / "appendonlydir").rename(root / "cache" / "appendonlydir.before")
        (root / "cache" / "appendonlydir.restore").mkdir()
        assert redisaddon.apps(root) == []
        assert redisaddon.settle_restores(root) == ["cache"]
        assert redisaddon.apps(root) == ["cache"]
        assert not (root / "cache" / "appendonlydir.restore").exists()
        redisaddon.start(root, "cache")
        assert redis_client.Redis.from_url(url).get("greeting") == b"bonjour"
        broken = home(archived) / "broken.rdb"
        broken.write_bytes(rdb.read_bytes()[:-12])
        with pytest.raises(redisaddon.RedisError):
            redisaddon.verify_rdb(broken, root / ".check-broken")
        key = (root / "cache" / "backup.key").read_text()
        backup_user = redis_client.Redis(port=int((root / "cache" / "port").read_text()),
                                         username=redisaddon.BACKUP_USER, password=key)
        with pytest.raises(redis_client.exceptions.NoPermissionError):
            backup_user.get("greeting")  # the backup user copies; it reads no key
    finally:
        redisaddon.destroy(root, "cache")


def test_an_apps_people_restore_its_redis_from_an_rdb_through_the_api_and_no_one_else(
        archived: Cluster) -> None:
    """redis:backups:capture, the keys changed, redis:backups:restore: the keys are as
    they were, with each step shown and one line saying it is done; another app's member
    can neither list, fetch nor restore; destroying the Redis takes a final copy, recorded
    through the API's own ledger connection."""
    import redis as redis_client

    from api.auth import create_user
    from tests.api_process import ApiProcess
    from tests.conftest import free_port_range
    from tests.fixtures.apps.fleet import release

    port = free_ports(1)[0]
    low, high = free_port_range(4)
    api = ApiProcess(tally_env(archived, TALLY_REDIS_PORTS=f"{low}-{high}"), port)
    try:
        api.wait_ready()
        with Ledger(archived.dsn()) as ledger:
            ann = create_user(ledger, "rita", "member")
            bob = create_user(ledger, "rob", "member")  # another app's member
            ledger.append("app-tea", [NewEvent("AppCreated", {"name": "tea",
                                                              "owner": "rita"})])
            release(ledger, home(archived), "tea", "hello", 1)

        call = partial(api_call, api.url)

        made = call(ann, "POST", "/apps/tea/addons", json={"kind": "redis"})
        assert made.status_code == 201, made.text
        url = call(ann, "GET", "/apps/tea/config").json()["config"]["REDIS_URL"]
        app = redis_client.Redis.from_url(url)  # the app itself
        app.set("flavour", "mint")
        app.rpush("orders", "1", "2")

        here = home(archived) / "laptop-redis"
        tally_cli = laptop(here, api.url, ann)

        captured = tally_cli("redis:backups:capture", "-a", "tea")
        assert captured.returncode == 0, captured.stderr
        backup_id = captured.stdout.strip()
        assert backup_id.startswith("redis-tea-")
        assert [x["state"] for x in call(ann, "GET", "/apps/tea/backups?kind=redis")
                .json()["backups"]] == ["verified"]
        assert call(ann, "GET", "/apps/tea/backups").json()["backups"] == []  # no database

        app.set("flavour", "garlic")
        app.delete("orders")
        app.set("later", "x")

        path = f"/apps/tea/backups/{backup_id}"
        for method, where, body in (("GET", "/apps/tea/backups?kind=redis", None),
                                    ("GET", f"{path}/download", None),
                                    ("POST", f"{path}/restore", {"confirm": "tea"}),
                                    ("POST", "/apps/tea/backups?kind=redis", None)):
            r = call(bob, method, where, json=body)
            assert r.status_code == 403, (where, r.status_code, r.text)
        assert call(ann, "POST", f"{path}/restore", json={"confirm": "te"}).status_code == 422
        refused = tally_cli("redis:backups:restore", "-a", "tea")
        assert refused.returncode == 1 and "--confirm tea" in refused.stderr
        assert app.get("flavour") == b"garlic", "nothing restored without the confirmation"

        downloaded = tally_cli("redis:backups:download", "-a", "tea")
        assert downloaded.returncode == 0, downloaded.stderr
        assert (here / f"{backup_id}.rdb").read_bytes()[:5] == b"REDIS"

        restored = tally_cli("redis:backups:restore", "-a", "tea", "--confirm", "tea")
        assert restored.returncode == 0, restored.stderr
        steps = restored.stderr.splitlines()
        assert any("checked the RDB: 2 keys" in s for s in steps), steps
        assert any("copying: 100%" in s for s in steps), steps
        assert steps[-1].startswith(f"Restored tea's Redis from {backup_id} ("), steps
        app = redis_client.Redis.from_url(url)  # the server was restarted
        assert app.get("flavour") == b"mint"
        assert app.lrange("orders", 0, -1) == [b"1", b"2"]
        assert app.get("later") is None
        with Ledger(archived.dsn()) as ledger:
            told = [e.data for e in ledger.read_stream("backup-redis:tea")
                    if e.type == "BackupRestored"]
        assert [(d["backup_id"], d["actor"]) for d in told] == [(backup_id, "rita")]

        # Destroying it takes a final copy first (through the API's ledger connection).
        app.set("last", "words")
        assert call(ann, "DELETE", "/apps/tea/addons/redis-tea").status_code == 200
        final = [x for x in call(ann, "GET", "/apps/tea/backups?kind=redis").json()["backups"]
                 if x["job"] == "final"]
        assert [x["state"] for x in final] == ["verified"]
        rdb = Repository(home(archived) / "backups").rdb("tea", final[0]["backup_id"])
        assert b"last" in rdb.read_bytes()
        with pytest.raises(redis_client.ConnectionError):
            redis_client.Redis.from_url(url, socket_connect_timeout=2).ping()
    finally:
        api.stop()
        from agents import redisaddon

        redisaddon.stop_all(home(archived) / "redis")


def test_a_segment_missing_from_the_wal_archive_is_found_recorded_and_fails_verify(
        archived: Cluster) -> None:
    """A segment deleted from the archive: the gap is recorded once (naming the backups
    whose point-in-time range it cuts), `tally backups` says MISSING, and a base backup
    whose range it falls in fails verification. The segments are put back after."""
    from dataclasses import asdict

    from agents.backups import base
    from agents.backups.walcheck import Gap

    agent = agent_of(archived)
    first = agent.run_ledger(None, job="capture", reason="capture")
    assert first is not None and backups(archived)[first].state == "verified"
    kept: dict[Path, bytes] = {}

    def lose_a_segment() -> str:
        """Three new segments archived (after all that was written so far); the middle
        one deleted."""
        archive_now(archived, agent)
        before = set(agent.repo.wal_segments())
        for i in range(3):
            append_apps(archived, f"gap{len(kept)}-{i}-", 3)
            archive_now(archived, agent)
        new = sorted(n for n in set(agent.repo.wal_segments()) - before if len(n) == 24)
        middle = agent.repo.wal_dir / new[1]
        kept[middle] = middle.read_bytes()
        middle.unlink()
        return new[1]

    try:
        lost = lose_a_segment()
        with Ledger(archived.dsn()) as ledger:
            assert agent.check_wal(ledger) == [Gap(lost, lost)]
            assert agent.check_wal(ledger) == [Gap(lost, lost)]  # recorded once
            found = [e.data for e in ledger.read_stream("backup-ledger")
                     if e.type == "WalGapFound"]
        assert [(d["first"], d["last"]) for d in found] == [(lost, lost)]
        assert first in found[0]["cut"]

        listed = subprocess.run([sys.executable, "-m", "tally.cli", "backups"],
                                env=tally_env(archived), capture_output=True, text=True,
                                timeout=60)
        assert listed.returncode == 1, listed.stderr  # a gap: exit 1, as pg_verifybackup
        assert f"MISSING {lost}" in listed.stderr and first in listed.stderr

        # A base backup whose point-in-time range the archive breaks fails its check.
        with Ledger(archived.dsn()) as ledger:
            taken = base.take(archived, agent.repo, "ledger-gap-check", ledger.sequence())
            lost_after = lose_a_segment()
            assert not agent.verify_ledger(ledger, "ledger-gap-check", asdict(taken))
        b = backups(archived)["ledger-gap-check"]
        assert b.state == "failed" and f"misses {lost_after}" in b.failed, b.failed
        assert not agent.repo.base("ledger-gap-check").exists()
    finally:
        for path, data in kept.items():
            path.write_bytes(data)
            path.chmod(0o600)
