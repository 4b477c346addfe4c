"""A local two-node PostgreSQL cluster for the ledger: a primary and a synchronous standby.

Built from PostgreSQL's own binaries (initdb, pg_ctl, pg_basebackup, pg_rewind) in a data
folder of ours. Nodes are named `a` and `b`; either can be the primary. A node is a standby
while `standby.signal` exists in its data directory. PostgreSQL refuses to run as root, so
when we are root every server-side command runs as the `postgres` user.

Promotion is manual and refuses to run while the other node's postmaster is alive: two
primaries accepting writes is the one thing a ledger must never allow.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2

from ledger.errors import ClusterError
from ledger.files import hand_over, write_for

NODES = ("a", "b")
ROLES = ("tally_owner", "tally_writer", "tally_reader", "tally_replicator")
DEFAULT_BIN = Path("/usr/lib/postgresql/15/bin")
CLIENT_TIMEOUTS = "connect_timeout=3 keepalives=1 keepalives_idle=5 keepalives_interval=2 " \
    "keepalives_count=3"
"""A dead host costs seconds, not minutes: a connection attempt gives up after 3 s, and an
established one whose peer vanished (no RST: a powered-off or partitioned host) is dropped
after ~11 s of silence, so the client reconnects through the multi-host DSN."""
READ_ONLY_ROLES = ("tally_reader",)
ROLE_SETUP = (
    # The sequencer and append's confirmation read the standby's flushed position, which
    # only pg_read_all_stats members see (migration 0008's ledger.durable_lsn runs as owner).
    "GRANT pg_read_all_stats TO tally_owner",
    # A reader never writes, so never holds a transaction id (every ledger reader waits for
    # the oldest one); the watchdog (agents/watchdog.py) bounds any session that does.
    *(f"ALTER ROLE {role} SET default_transaction_read_only = on" for role in READ_ONLY_ROLES),
)
"""Idempotent role settings, applied at init and at every start (older clusters too)."""
XID_FUNCTIONS = ("pg_current_xact_id()", "txid_current()")
"""Functions that hand a session a transaction id though it writes nothing: only the roles
that write may call them, in every database of the cluster (per-database catalogues)."""


def pid_alive(pid: int) -> bool:
    """True if the process runs. A zombie does not: killed processes whose parent has
    exited wait for PID 1 to reap them, which here can take a while."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@dataclass(frozen=True)
class ClusterSpec:
    """Where the cluster lives and how it is reached."""

    data_dir: Path
    ports: tuple[int, int] = (5433, 5434)
    host: str = "127.0.0.1"
    dbname: str = "tally"
    bin_dir: Path = DEFAULT_BIN
    os_user: str = "postgres"
    extra_settings: dict[str, str] = field(default_factory=dict)
    ledger: bool = True
    """The ledger's cluster: only its writing roles may take a transaction id without
    writing (the apps' cluster leaves its databases as PostgreSQL makes them)."""
    archive_command: str = ""
    """Continuous WAL archiving (agents/backups/repository.py): the primary runs this for
    each finished segment; empty: no archiving."""

    def archive_settings(self) -> dict[str, str]:
        """archive_mode, archive_command and archive_timeout as plain values (none when
        not archiving): a quiet ledger still archives a segment a minute."""
        if not self.archive_command:
            return {}
        return {"archive_mode": "on", "archive_command": self.archive_command,
                "archive_timeout": "60s"}


@dataclass(frozen=True)
class NodeStatus:
    """What `tally ledger status` prints for one node."""

    name: str
    port: int
    running: bool
    role: str  # primary | standby | stopped
    replication: list[dict[str, Any]] = field(default_factory=list)
    receive_lsn: str | None = None
    replay_lsn: str | None = None
    replay_delay_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Cluster:
    """Create, start, stop, inspect and promote the local ledger cluster."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.root = spec.data_dir.resolve()

    # -- paths and credentials ------------------------------------------------------------
    def node_dir(self, node: str) -> Path:
        return self.root / node

    def port(self, node: str) -> int:
        return self.spec.ports[NODES.index(node)]

    def other(self, node: str) -> str:
        return NODES[1 - NODES.index(node)]

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def credentials_file(self) -> Path:
        return self.root / "credentials.json"

    def initialized(self) -> bool:
        return self.credentials_file.exists() and (self.node_dir("a") / "PG_VERSION").exists()

    def credentials(self) -> dict[str, str]:
        try:
            return json.loads(self.credentials_file.read_text())
        except FileNotFoundError:
            raise ClusterError(
                f"no ledger cluster in {self.root}: run `tally ledger init`") from None

    def dsn(self, role: str = "tally_writer", *, read_write: bool = True) -> str:
        """A libpq multi-host DSN over both nodes; libpq finds the primary itself."""
        password = self.credentials()[role]
        # A read-only role's sessions are read-only everywhere: "primary" asks the server
        # whether it is in recovery rather than whether the session may write.
        target = ("primary" if role in READ_ONLY_ROLES else "read-write") if read_write else "any"
        ports = ",".join(str(p) for p in self.spec.ports)
        hosts = ",".join([self.spec.host] * len(self.spec.ports))
        return (
            f"host={hosts} port={ports} dbname={self.spec.dbname} user={role} "
            f"password={password} target_session_attrs={target} {CLIENT_TIMEOUTS}"
        )

    def node_dsn(self, node: str, role: str = "postgres", dbname: str | None = None) -> str:
        password = self.credentials()[role]
        return (
            f"host={self.spec.host} port={self.port(node)} dbname={dbname or self.spec.dbname} "
            f"user={role} password={password} connect_timeout=3"
        )

    # -- running things as postgres -------------------------------------------------------
    def _as_pg(self) -> dict[str, Any]:
        if os.geteuid() == 0:
            return {"user": self.spec.os_user, "group": self.spec.os_user}
        return {}

    def _run(self, *args: str | Path, env: dict[str, str] | None = None) -> str:
        cmd = [str(a) for a in args]
        full_env = {**os.environ, "LC_ALL": "C.UTF-8", **(env or {})}
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=full_env, cwd="/", **self._as_pg()
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise ClusterError(f"{Path(cmd[0]).name} failed: " + " | ".join(tail))
        return proc.stdout

    def _bin(self, name: str) -> Path:
        path = self.spec.bin_dir / name
        if not path.exists():
            raise ClusterError(
                f"{path} not found: install PostgreSQL 15 (Debian: apt-get install postgresql)"
            )
        return path

    def _close(self, path: Path) -> None:
        """The cluster's folder: its server user may pass, nobody else (apps may run on
        this machine; its logs and credentials are the platform's)."""
        if os.geteuid() == 0:
            shutil.chown(path, "root", self.spec.os_user)
            path.chmod(0o710)
        else:
            path.chmod(0o700)

    # -- lifecycle ------------------------------------------------------------------------
    def init(self) -> None:
        """Create both nodes: initdb the primary, add roles and the database, base-backup
        the standby, then make it synchronous once it streams under its own name."""
        if self.root.exists() and any(self.root.iterdir()):
            raise ClusterError(f"{self.root} is not empty: a ledger cluster may exist there")
        try:
            self._init()
        except BaseException:
            self.destroy()
            raise

    def _init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._close(self.root)
        self.socket_dir.mkdir(exist_ok=True)
        hand_over(self.socket_dir, self.spec.os_user)
        creds = {role: secrets.token_urlsafe(24) for role in ("postgres", *ROLES)}
        self.credentials_file.touch(mode=0o600)
        self.credentials_file.write_text(json.dumps(creds, indent=1))

        primary = self.node_dir("a")
        primary.mkdir(mode=0o700)
        hand_over(primary, self.spec.os_user)
        pwdir = Path(tempfile.mkdtemp(prefix=".pw-", dir=self.root))  # 0700, empty
        pwfile = pwdir / "pw"
        try:
            hand_over(pwdir, self.spec.os_user)
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:  # private before the first byte is written
                hand_over(pwfile, self.spec.os_user)
                f.write(creds["postgres"] + "\n")
            self._run(
                self._bin("initdb"), "-D", primary, "-U", "postgres", f"--pwfile={pwfile}",
                "--auth-local=peer", "--auth-host=scram-sha-256", "-E", "UTF8",
                "--locale=C", "--no-instructions",
            )
        finally:
            shutil.rmtree(pwdir, ignore_errors=True)
        with open(primary / "pg_hba.conf", "a") as hba:
            hba.write(f"host replication tally_replicator {self.spec.host}/32 scram-sha-256\n")
        self._write_node_conf("a")
        self.start_node("a")
        self._create_roles(creds)
        self._setup_roles("a")
        self._create_standby("b")
        self.start_node("b")
        self.wait_streaming("a", "b")
        self.set_synchronous("a", "b")

    def _write_node_conf(self, node: str) -> None:
        """Rewrite this node's own settings. Called after initdb, basebackup and rewind,
        since the latter two copy the other node's configuration files."""
        other = self.other(node)
        password = self.credentials()["tally_replicator"]
        settings = {
            "listen_addresses": f"'{self.spec.host}'",
            "port": str(self.port(node)),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "300",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "wal_log_hints": "on",
            "hot_standby": "on",
            "wal_keep_size": "'512MB'",
            "max_slot_wal_keep_size": "'4GB'",
            # A transaction left open holds back every ledger reader (see ledger/store.py).
            "idle_in_transaction_session_timeout": "'60s'",
            # Logs are the platform's: never world-readable, and a failed statement (a lost
            # append race carries a tenant's config values) is not logged with its text.
            "log_file_mode": "0600",
            "log_min_error_statement": "panic",
            "log_error_verbosity": "terse",
            "cluster_name": f"'tally_{node}'",
            "primary_conninfo": (
                f"'host={self.spec.host} port={self.port(other)} user=tally_replicator "
                f"password={password} application_name=tally_{node}'"
            ),
            "primary_slot_name": f"'tally_{node}'",
            **{k: "'" + v.replace("'", "''") + "'"
               for k, v in self.spec.archive_settings().items()},
            **self.spec.extra_settings,
        }
        conf = self.node_dir(node) / "postgresql.conf"
        marker = "# --- tally node settings ---"
        base = conf.read_text().split(marker)[0]
        lines = [f"{k} = {v}" for k, v in settings.items()]
        write_for(conf, base + marker + "\n" + "\n".join(lines) + "\n", self.spec.os_user)

    def _create_roles(self, creds: dict[str, str], node: str = "a",
                      roles: tuple[str, ...] = ROLES, slots: bool = True) -> None:
        conn = self._connect(node, dbname="postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                for role in roles:
                    extra = " REPLICATION" if role == "tally_replicator" else ""
                    cur.execute(f"CREATE ROLE {role} LOGIN{extra} PASSWORD %s", (creds[role],))
                # Bound transaction time: a long writing transaction stalls ledger readers.
                for role in ("tally_owner", "tally_writer"):
                    cur.execute(f"ALTER ROLE {role} SET statement_timeout = '30s'")
                    cur.execute(
                        f"ALTER ROLE {role} SET idle_in_transaction_session_timeout = '10s'")
                cur.execute(f"CREATE DATABASE {self.spec.dbname} OWNER tally_owner")
                for name in NODES if slots else ():
                    cur.execute("SELECT pg_create_physical_replication_slot(%s)",
                                (f"tally_{name}",))
        finally:
            conn.close()

    def _setup_roles(self, node: str) -> None:
        """Apply ROLE_SETUP, and keep the xid functions to the writing roles."""
        for statement in ROLE_SETUP:
            self._query(node, statement)
        if not self.spec.ledger:
            return
        for db in (self.spec.dbname, "postgres", "template1"):
            conn = self._connect(node, dbname=db)
            conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    for fn in XID_FUNCTIONS:
                        cur.execute(f"REVOKE EXECUTE ON FUNCTION pg_catalog.{fn} FROM PUBLIC")
                        cur.execute(f"GRANT EXECUTE ON FUNCTION pg_catalog.{fn} "
                                    f"TO tally_owner, tally_writer")
            finally:
                conn.close()

    def _create_standby(self, node: str) -> None:
        target = self.node_dir(node)
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(mode=0o700)
        hand_over(target, self.spec.os_user)
        source = self.other(node)
        password = self.credentials()["tally_replicator"]
        self._run(
            self._bin("pg_basebackup"), "-h", self.spec.host, "-p", str(self.port(source)),
            "-U", "tally_replicator", "-D", target, "-X", "stream", "--checkpoint=fast",
            env={"PGPASSWORD": password},
        )
        write_for(target / "standby.signal", "", self.spec.os_user)
        self._write_node_conf(node)

    def start_node(self, node: str) -> None:
        if self._running(node):
            return
        self._clear_stale_locks(node)
        conf = (self.node_dir(node) / "postgresql.conf").read_text()
        if "\nlog_min_error_statement =" not in conf or (
                self.spec.archive_command and self.spec.archive_command not in conf):
            self._write_node_conf(node)  # made before its logs were private, or archived
        log = self.root / f"{node}.log"
        log.touch(mode=0o600)
        log.chmod(0o600)
        hand_over(log, self.spec.os_user)
        try:
            self._run(self._bin("pg_ctl"), "-D", self.node_dir(node), "-l", log, "-w", "-t",
                      "60", "start")
        except ClusterError as exc:
            tail = " | ".join(log.read_text().strip().splitlines()[-3:])
            raise ClusterError(f"node {node} did not start: {tail}") from exc

    def stop_node(self, node: str, mode: str = "fast") -> None:
        if self._running(node):
            self._run(self._bin("pg_ctl"), "-D", self.node_dir(node), "-m", mode, "-w", "stop")

    def require(self) -> None:
        """Raise a clear error unless a cluster has been created here."""
        if not self.initialized():
            raise ClusterError(f"no ledger cluster in {self.root}: run `tally ledger init`")

    def start(self) -> None:
        """Start both nodes, the primary first."""
        self.require()
        self._close(self.root)  # a cluster made before its folder was closed
        for node in sorted(NODES, key=self.is_standby):
            self.start_node(node)
        self._setup_roles(self.primary())  # for clusters made before these were set

    def stop(self) -> None:
        """Stop both nodes, the standby first so the primary's last WAL still reaches it."""
        for node in sorted(NODES, key=self.is_standby, reverse=True):
            self.stop_node(node)

    def is_standby(self, node: str) -> bool:
        return (self.node_dir(node) / "standby.signal").exists()

    def primary(self) -> str:
        """The node configured as primary (the one without standby.signal)."""
        for node in NODES:
            if self.node_dir(node).exists() and not self.is_standby(node):
                return node
        raise ClusterError("no node is configured as primary")

    def _running(self, node: str) -> bool:
        pid_file = self.node_dir(node) / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return False
        return pid_alive(pid)

    def _clear_stale_locks(self, node: str) -> None:
        """Remove the lock files of a postmaster killed with -9 but not yet reaped:
        PostgreSQL takes the zombie for a live postmaster and refuses to start."""
        if self._running(node):
            return
        (self.node_dir(node) / "postmaster.pid").unlink(missing_ok=True)
        (self.socket_dir / f".s.PGSQL.{self.port(node)}.lock").unlink(missing_ok=True)

    def postmaster_pid(self, node: str) -> int:
        return int((self.node_dir(node) / "postmaster.pid").read_text().split()[0])

    # -- replication ----------------------------------------------------------------------
    def _connect(self, node: str, dbname: str | None = None) -> Any:
        return psycopg2.connect(self.node_dsn(node, dbname=dbname or "postgres"))

    def _query(self, node: str, sql: str, args: tuple = ()) -> list[tuple]:
        conn = self._connect(node)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def wait_streaming(self, primary: str, standby: str, timeout: float = 60.0,
                       settle: float = 0.0) -> None:
        """Until the standby streams from the primary (and still does `settle` s later)."""
        deadline = time.monotonic() + timeout
        since: float | None = None
        while time.monotonic() < deadline:
            rows = self._query(
                primary, "SELECT 1 FROM pg_stat_replication WHERE application_name = %s "
                "AND state = 'streaming'", (f"tally_{standby}",),
            )
            now = time.monotonic()
            since = (since or now) if rows else None
            if since is not None and now - since >= settle:
                return
            time.sleep(0.1)
        raise ClusterError(f"standby {standby} did not start streaming within {timeout:.0f}s")

    def set_synchronous(self, primary: str, standby: str | None) -> None:
        """Name the standby in synchronous_standby_names (None: run without one)."""
        value = f"tally_{standby}" if standby else ""
        self._query(primary, "ALTER SYSTEM SET synchronous_standby_names = %s", (value,))
        self._query(primary, "SELECT pg_reload_conf()")

    def status(self) -> list[NodeStatus]:
        self.require()
        out = []
        for node in NODES:
            if not self.node_dir(node).exists():
                continue
            if not self._running(node):
                out.append(NodeStatus(node, self.port(node), False, "stopped"))
                continue
            try:
                out.append(self._node_status(node))
            except psycopg2.Error as exc:
                out.append(NodeStatus(node, self.port(node), True, f"unreachable: {exc}".strip()))
        return out

    def _node_status(self, node: str) -> NodeStatus:
        (in_recovery,), = self._query(node, "SELECT pg_is_in_recovery()")
        if not in_recovery:
            rows = self._query(
                node,
                "SELECT application_name, state, sync_state, "
                "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint, "
                "extract(epoch FROM replay_lag)::float FROM pg_stat_replication",
            )
            repl = [
                {"standby": r[0], "state": r[1], "sync_state": r[2], "lag_bytes": r[3],
                 "replay_lag_s": r[4]}
                for r in rows
            ]
            return NodeStatus(node, self.port(node), True, "primary", replication=repl)
        (recv, replay, delay), = self._query(
            node,
            "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, "
            "extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float",
        )
        return NodeStatus(node, self.port(node), True, "standby", receive_lsn=recv,
                          replay_lsn=replay, replay_delay_s=delay)

    def promote(self, node: str | None = None) -> str:
        """Promote the standby. Refused while the old primary's postmaster is alive."""
        node = node or next(n for n in NODES if self.is_standby(n))
        if not self.is_standby(node):
            raise ClusterError(f"node {node} is already the primary")
        old = self.other(node)
        if self._running(old):
            raise ClusterError(
                f"node {old} (port {self.port(old)}) is still running: stop it first "
                f"(`tally ledger stop --node {old}`); promoting now would make two primaries"
            )
        if not self._running(node):
            self.start_node(node)
        self._run(self._bin("pg_ctl"), "-D", self.node_dir(node), "-w", "-t", "60", "promote")
        # Run without a synchronous standby until the old primary rejoins: availability
        # first, as Patroni does unless synchronous_mode_strict is set.
        self.set_synchronous(node, None)
        return node

    def rejoin(self, node: str) -> None:
        """Turn a stopped former primary into the synchronous standby of the current one.

        pg_rewind first (fast: copies only what diverged); if the node still cannot follow
        the new timeline (pg_rewind 15 says "no rewind required" when a crashed primary's
        only divergence is its end-of-recovery checkpoint), clone it afresh with
        pg_basebackup, as Patroni falls back to reinit."""
        primary = self.other(node)
        if self.is_standby(primary):
            raise ClusterError(f"node {primary} is not the primary; promote it first")
        self.stop_node(node)
        self._clear_stale_locks(node)  # pg_rewind (>= 13) runs crash recovery itself
        slot = f"tally_{node}"
        self._query(primary, "SELECT pg_create_physical_replication_slot(%s) WHERE NOT EXISTS "
                    "(SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)", (slot, slot))
        password = self.credentials()["postgres"]
        try:
            self._run(
                self._bin("pg_rewind"), "-D", self.node_dir(node), "--source-server",
                f"host={self.spec.host} port={self.port(primary)} user=postgres "
                f"password={password} dbname=postgres",
            )
            write_for(self.node_dir(node) / "standby.signal", "", self.spec.os_user)
            self._write_node_conf(node)
            self.start_node(node)
            self.wait_streaming(primary, node, timeout=15, settle=1.0)
        except ClusterError:
            self.stop_node(node, mode="immediate")
            self._create_standby(node)
            self.start_node(node)
            self.wait_streaming(primary, node)
        self.set_synchronous(primary, node)

    def destroy(self) -> None:
        """Stop both nodes (immediately) and remove the data folder."""
        for node in NODES:
            if self.node_dir(node).exists():
                with contextlib.suppress(ClusterError):
                    self.stop_node(node, mode="immediate")
        shutil.rmtree(self.root, ignore_errors=True)
