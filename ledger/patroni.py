"""PostgreSQL under Patroni, with etcd as its store: failover by an engine, not by us.

tally writes Patroni's and etcd's configuration, starts them, and reads their state through
Patroni's REST API; it never promotes anything itself. A scope names one HA cluster in etcd,
so the apps' data tier can run its own with this same code.

Choices, each for a reason:
- synchronous_mode, not strict (`HASpec.strict` turns strict on). Patroni promotes only a
  node recorded as synchronous (`/sync` in etcd), which has every acknowledged append, so
  a failover never loses one. Not strict: while the other node is down, Patroni empties
  synchronous_standby_names and the primary acknowledges alone (durable on its own disk;
  `ledger.durable_lsn()` then counts the primary's flush), and names the standby again once
  it streams. Strict would refuse every commit then: with two nodes, any one node down (a
  failover included, until the old primary has rewound and rejoined: ~20 s measured here)
  would stop writes. Production with three or more nodes may run strict and lose one.
- use_pg_rewind, with wal_log_hints and data checksums: the old primary rejoins as a
  standby by copying what diverged, not the whole ledger.
- primary_start_timeout 0: a crashed primary is failed over at once rather than restarted
  in place (crash recovery of a busy primary takes longer than a promotion).
- ttl 20 s (Patroni's minimum), loop_wait 1 s, retry_timeout 3 s: a crashed postmaster is
  seen within a loop and failed over in seconds; a hung or dead Patroni loses the leader key
  after ttl. Patroni's defaults (30/10/10) give ~30 s.
- pg_basebackup with a fast checkpoint: the default spread checkpoint made a new replica
  wait up to checkpoint_timeout x 0.9 (95 s measured here) for a few hundred buffers.
- etcd with authentication: root and a `tally` user (passwords in the cluster's 0600
  credentials file) that may read and write only the `/tally/` keys, so a process on this
  machine that is not Patroni (an app) cannot write the leader key. Without the passwords
  etcd answers nothing but its version and leases.
- watchdog mode "off" by default: Patroni's watchdog needs /dev/watchdog (softdog) that
  Patroni's user may open; `HASpec.watchdog` takes "automatic" or "required" where the
  machine has one (production: see the README).
- Each process writes its own pid file before it becomes etcd or Patroni, so the same
  commands run detached (`HA.launch`, tests and `tally ledger start`) or under a
  supervisor (`tally up`), and `HA.signal`/`stop` find them either way.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg2

from ledger.cluster import DEFAULT_BIN, NODES, ROLES, Cluster, ClusterSpec, pid_alive
from ledger.errors import ClusterError
from ledger.files import hand_over, server_user, write_for

TIMINGS = {"ttl": 20, "loop_wait": 1, "retry_timeout": 3}
_CHILDREN: list[subprocess.Popen] = []
"""Processes started here, kept so they are reaped (not warned about) when they end."""
PATRONI = Path(__file__).resolve().parents[1] / ".venv-ha" / "bin" / "patroni"
"""Patroni runs as postgres, from a virtualenv on the system Python (`make install`)."""


@dataclass(frozen=True)
class Process:
    """One long-running process of an HA cluster, as any supervisor runs it: it writes its
    pid file, then becomes the program."""

    name: str
    argv: list[str]
    user: str | None  # None: whoever starts it
    env: dict[str, str]


class EtcdError(ClusterError):
    """etcd refused a call (its own message)."""


def writes_pid(pid_file: Path, argv: list[str]) -> list[str]:
    """`argv` behind a shell that first records its pid (which exec keeps) in `pid_file`,
    atomically: the file may be left by another user (root) in the process's folder."""
    script = 'echo $$ > "$0.new" && mv -f "$0.new" "$0" && exec "$@"'
    return ["/bin/sh", "-c", script, str(pid_file), *argv]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


Launch = Callable[[list[Process]], None]
"""Starts these processes unless they run, and keeps them running: `HA.launch` (detached
children) or a supervisor's (tally up's supervisord)."""

ETCD_PREFIX = "/tally/"
"""Patroni's namespace in etcd: the only keys its etcd user may read or write."""


@dataclass(frozen=True)
class HASpec:
    """One Patroni-managed cluster on this machine: etcd and a node per name."""

    root: Path
    scope: str
    names: tuple[str, ...]
    pg_ports: tuple[int, ...]
    rest_ports: tuple[int, ...]
    etcd_ports: tuple[int, int]  # client, peer
    host: str = "127.0.0.1"
    bin_dir: Path = DEFAULT_BIN
    os_user: str = "postgres"
    strict: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)
    local_parameters: dict[str, Any] = field(default_factory=dict)
    """Each node's own postgresql parameters, applied at every start (WAL archiving)."""
    patroni_bin: Path = PATRONI
    watchdog: str = "off"

    @property
    def etcd_url(self) -> str:
        return f"http://{self.host}:{self.etcd_ports[0]}"


def etcd_command(spec: HASpec) -> list[str]:
    """A one-member etcd for this machine (production runs three: see the README)."""
    client, peer = (f"http://{spec.host}:{p}" for p in spec.etcd_ports)
    return [
        shutil.which("etcd") or "/usr/bin/etcd", "--name", "tally-etcd",
        "--data-dir", str(spec.root / "etcd"),
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"tally-etcd={peer}", "--initial-cluster-state", "new",
        "--initial-cluster-token", spec.scope, "--log-level", "warn",
    ]


def rewind_wrapper(spec: HASpec) -> Path:
    return spec.root / "run" / "pg_rewind"


def patroni_config(spec: HASpec, name: str, secrets: dict[str, str]) -> dict[str, Any]:
    """Patroni's configuration for node `name` (a plain dict, written as JSON: YAML is a
    superset)."""
    i = spec.names.index(name)
    host = spec.host
    return {
        "scope": spec.scope,
        "namespace": ETCD_PREFIX,
        "name": name,
        "restapi": {
            "listen": f"{host}:{spec.rest_ports[i]}",
            "connect_address": f"{host}:{spec.rest_ports[i]}",
            # Unsafe endpoints (switchover, restart, reinitialize) need this.
            "authentication": {"username": "tally", "password": secrets["patroni_api"]},
        },
        "etcd3": {"hosts": [f"{host}:{spec.etcd_ports[0]}"],
                  **({"username": "tally", "password": secrets["etcd_tally"]}
                     if "etcd_tally" in secrets else {})},
        "watchdog": {"mode": spec.watchdog},
        "bootstrap": {
            "dcs": {
                **TIMINGS,
                "primary_start_timeout": 0,
                "synchronous_mode": True,
                "synchronous_mode_strict": spec.strict,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": {
                        "wal_level": "replica", "wal_log_hints": "on", "hot_standby": "on",
                        "max_connections": 300, "max_wal_senders": 10,
                        "max_replication_slots": 10, "wal_keep_size": "512MB",
                        "max_slot_wal_keep_size": "4GB",
                        "idle_in_transaction_session_timeout": "60s",
                        **spec.parameters,
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums",
                       {"auth-local": "peer"}, {"auth-host": "scram-sha-256"}],
        },
        "postgresql": {
            "listen": f"{host}:{spec.pg_ports[i]}",
            "connect_address": f"{host}:{spec.pg_ports[i]}",
            "data_dir": str(spec.root / name),
            "bin_dir": str(spec.bin_dir),
            # pg_rewind --progress: Patroni logs its output, which then says how much a
            # rejoin copied ("need to copy N MB (total source directory size is M MB)").
            "bin_name": {"pg_rewind": str(rewind_wrapper(spec))},
            "pgpass": str(spec.root / "run" / f"pgpass-{name}"),
            # A spread checkpoint made a new replica wait ~95 s for a few hundred buffers.
            "basebackup": [{"checkpoint": "fast"}],
            "authentication": {
                "superuser": {"username": "postgres", "password": secrets["postgres"]},
                "replication": {"username": "tally_replicator",
                                "password": secrets["tally_replicator"]},
                "rewind": {"username": "postgres", "password": secrets["postgres"]},
            },
            "parameters": {"unix_socket_directories": str(spec.root / "run"),
                           **spec.local_parameters},
            "pg_hba": [
                "local all postgres peer",
                f"host replication tally_replicator {host}/32 scram-sha-256",
                f"host all all {host}/32 scram-sha-256",
            ],
        },
        "log": {"level": "INFO"},
    }


class HA:
    """Start, stop and read one Patroni + etcd cluster on this machine."""

    def __init__(self, spec: HASpec, credentials: dict[str, str]) -> None:
        self.spec = spec
        self.secrets = credentials
        self.root = spec.root

    # -- files ----------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def config_file(self, name: str) -> Path:
        return self.run_dir / f"patroni-{name}.yml"

    def write_configs(self) -> None:
        """Write etcd's folder and each node's Patroni config (0600, owned by postgres)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        private = [self.root / "etcd", *(self.root / name for name in self.spec.names)]
        for path in private:
            path.mkdir(mode=0o700, exist_ok=True)
        for path in (self.run_dir, *private):
            hand_over(path, self.spec.os_user)
        wrapper = rewind_wrapper(self.spec)
        # "--help" stays first when Patroni asks whether pg_rewind works.
        write_for(wrapper, f'#!/bin/sh\nexec {self.spec.bin_dir / "pg_rewind"} "$@" --progress\n',
                  mode=0o755)
        for name in self.spec.names:
            write_for(self.config_file(name), json.dumps(
                patroni_config(self.spec, name, self.secrets), indent=1), self.spec.os_user)

    # -- processes ------------------------------------------------------------------------
    def processes(self) -> list[Process]:
        """What runs: etcd, then one Patroni per node, each as the cluster's OS user."""
        if not self.spec.patroni_bin.exists():
            raise ClusterError(f"{self.spec.patroni_bin} not found: run `make install`")
        commands = {"etcd": etcd_command(self.spec)}
        for name in self.spec.names:
            commands[f"patroni-{name}"] = [str(self.spec.patroni_bin),
                                           str(self.config_file(name))]
        user = server_user(self.spec.os_user)
        env = {"LC_ALL": "C.UTF-8", "PATH": f"{self.spec.bin_dir}:/usr/bin:/bin"}
        return [Process(name, writes_pid(self.pid_file(name), argv), user, env)
                for name, argv in commands.items()]

    def pid_file(self, process: str) -> Path:
        return self.run_dir / f"{process}.pid"

    def pid(self, process: str) -> int | None:
        """The process's pid from its pid file, if a process of the cluster's user runs
        there: the file is that user's to write, and root signals what it names."""
        try:
            pid = int(self.pid_file(process).read_text())
        except (FileNotFoundError, ValueError):
            return None
        if not pid_alive(pid):
            return None
        user = server_user(self.spec.os_user)
        expected = pwd.getpwnam(user).pw_uid if user else os.getuid()
        try:
            return pid if psutil.Process(pid).uids().real == expected else None
        except psutil.Error:
            return None

    def launch(self, processes: list[Process]) -> None:
        """Start each process that is not running as a detached child (its own session:
        it outlives the command that started it)."""
        for process in processes:
            if self.pid(process.name) is not None:
                continue
            log = open(self.root / f"{process.name}.log", "ab")  # noqa: SIM115 (child keeps it)
            proc = subprocess.Popen(process.argv, stdout=log, stderr=log, cwd=self.root,
                                    env={**os.environ, **process.env},
                                    start_new_session=True, user=process.user or None,
                                    group=process.user or None)
            log.close()
            _CHILDREN[:] = [p for p in _CHILDREN if p.poll() is None] + [proc]
            write_for(self.pid_file(process.name), str(proc.pid), mode=0o644)

    def start_process(self, name: str) -> None:
        """Start one process (by name) unless it runs, detached."""
        self.launch([p for p in self.processes() if p.name == name])

    def start(self, timeout: float = 90.0, launch: Launch | None = None) -> None:
        """Start etcd and every node (by `launch`, default detached children), then wait for
        a leader. A new cluster's nodes race for the initialize key; the loser clones the
        winner. A new etcd first gets its users and authentication (then stops again), so
        Patroni never meets it open."""
        self.write_configs()
        if "etcd_root" in self.secrets and not self.auth_marker.exists():
            self.start_process("etcd")
            self.enable_etcd_auth(timeout)
            self.stop_process("etcd", timeout)
        (launch or self.launch)(self.processes())
        self.wait_leader(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop every Patroni (which stops its PostgreSQL), then etcd."""
        names = [p.name for p in self.processes()]
        for process in names[1:] + names[:1]:
            self.stop_process(process, timeout)

    def stop_process(self, process: str, timeout: float) -> None:
        """SIGTERM, and SIGKILL if it still runs after `timeout`."""
        self.signal(process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.pid(process) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        self.signal(process, signal.SIGKILL)

    def signal(self, process: str, sig: int) -> bool:
        pid = self.pid(process)
        if pid is None:
            return False
        os.kill(pid, sig)
        for child in _CHILDREN:
            if child.pid == pid and sig == signal.SIGKILL:
                child.wait()
        return True

    # -- etcd's users ---------------------------------------------------------------------
    @property
    def auth_marker(self) -> Path:
        return self.root / "etcd" / "tally-auth"

    def enable_etcd_auth(self, timeout: float) -> None:
        """Give etcd a root user and a `tally` user that may read and write only Patroni's
        keys, then turn authentication on. Safe to repeat after a crash half-way."""
        if self._etcd_auth_on(time.monotonic() + timeout):
            write_for(self.auth_marker, "on\n")
            return
        prefix = ETCD_PREFIX.encode()
        steps: list[tuple[str, dict[str, Any]]] = [
            ("auth/user/add", {"name": "root", "password": self.secrets["etcd_root"]}),
            ("auth/role/add", {"name": "root"}),
            ("auth/user/grant", {"user": "root", "role": "root"}),
            ("auth/role/add", {"name": "tally-patroni"}),
            ("auth/role/grant", {"name": "tally-patroni", "perm": {
                "permType": "READWRITE", "key": _b64(prefix),
                "range_end": _b64(prefix[:-1] + bytes([prefix[-1] + 1]))}}),
            ("auth/user/add", {"name": "tally", "password": self.secrets["etcd_tally"]}),
            ("auth/user/grant", {"user": "tally", "role": "tally-patroni"}),
            ("auth/enable", {}),
        ]
        for path, body in steps:
            try:
                self.etcd_call(path, body)
            except EtcdError as exc:
                # Done before a crash, or authentication already on (nothing left to do).
                if "already exists" not in str(exc) and "user name is empty" not in str(exc):
                    raise ClusterError(f"etcd refused {path}: {exc}") from exc
        write_for(self.auth_marker, "on\n")

    def _etcd_auth_on(self, deadline: float) -> bool:
        """Whether etcd checks passwords already (waiting until it answers)."""
        while True:
            try:
                self.etcd_call("auth/authenticate", {"name": "root",
                                                     "password": self.secrets["etcd_root"]})
                return True
            except EtcdError as exc:
                if "not enabled" in str(exc):
                    return False
                raise ClusterError(f"etcd refused tally's root user: {exc}") from exc
            except OSError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"etcd did not answer on {self.spec.etcd_url}: see "
                                       f"{self.root}/etcd.log") from None
                time.sleep(0.1)

    def etcd_call(self, path: str, body: dict[str, Any], token: str | None = None,
                  timeout: float = 3.0) -> dict[str, Any]:
        """One call to etcd's v3 JSON gateway; EtcdError with etcd's message if refused."""
        req = urllib.request.Request(f"{self.spec.etcd_url}/v3/{path}",
                                     data=json.dumps(body).encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", token)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as reply:
                answer: dict[str, Any] = json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            answer = json.loads(exc.read() or b"{}")
        if "error" in answer:
            raise EtcdError(answer["error"])
        return answer

    # -- state (Patroni's REST API) -------------------------------------------------------
    def _request(self, port: int, path: str, body: dict | None = None,
                 timeout: float = 3.0) -> Any:
        url = f"http://{self.spec.host}:{port}{path}"
        req = urllib.request.Request(url, method="GET" if body is None else "POST")
        if body is not None:
            req.data = json.dumps(body).encode()
            req.add_header("Content-Type", "application/json")
            token = base64.b64encode(f"tally:{self.secrets['patroni_api']}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            text = reply.read().decode()
        try:
            return json.loads(text)
        except ValueError:
            return text

    def cluster_state(self) -> dict[str, Any]:
        """Patroni's view (/cluster) from the first node that answers."""
        errors = []
        for port in self.spec.rest_ports:
            try:
                return self._request(port, "/cluster")
            except (OSError, urllib.error.URLError) as exc:
                errors.append(f"{port}: {exc}")
        raise ClusterError("no Patroni REST API answers: " + "; ".join(errors))

    def leader(self) -> str | None:
        """The member holding the leader key and running, if any."""
        try:
            members = self.cluster_state()["members"]
        except ClusterError:
            return None
        return next((m["name"] for m in members
                     if m["role"] == "leader" and m["state"] == "running"), None)

    def wait_leader(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (leader := self.leader()) is None:
            if time.monotonic() > deadline:
                raise ClusterError(f"no Patroni leader within {timeout:.0f}s: see "
                                   f"{self.root}/patroni-*.log")
            time.sleep(0.2)
        return leader

    def wait_members(self, count: int, timeout: float) -> None:
        """Until `count` members stream, one of them the synchronous standby."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                members = self.cluster_state()["members"]
            except ClusterError:
                members = []
            ready = [m for m in members if m["role"] == "leader" and m["state"] == "running"
                     or m["state"] == "streaming"]
            if len(ready) >= count and any(m["role"] == "sync_standby" for m in members):
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"only {len(ready)} of {count} members ready within "
                                   f"{timeout:.0f}s: {members}")
            time.sleep(0.2)

    def switchover(self, candidate: str | None = None) -> str:
        """Ask Patroni to hand the leadership to `candidate` (default: the sync standby)."""
        state = self.cluster_state()
        leader = next((m["name"] for m in state["members"] if m["role"] == "leader"), None)
        if leader is None:
            raise ClusterError("no leader to switch over from")
        candidate = candidate or next(
            (m["name"] for m in state["members"] if m["role"] == "sync_standby"), None)
        if candidate is None:
            raise ClusterError("no synchronous standby to switch over to")
        port = self.spec.rest_ports[self.spec.names.index(leader)]
        try:
            self._request(port, "/switchover", {"leader": leader, "candidate": candidate},
                          timeout=60)
        except urllib.error.HTTPError as exc:
            raise ClusterError(f"switchover refused: {exc.read().decode().strip()}") from exc
        return candidate

    def reinit(self, name: str) -> None:
        """Ask Patroni to rebuild replica `name` from the leader (pg_basebackup)."""
        port = self.spec.rest_ports[self.spec.names.index(name)]
        try:
            self._request(port, "/reinitialize", {"force": True}, timeout=30)
        except urllib.error.HTTPError as exc:
            raise ClusterError(f"reinit refused: {exc.read().decode().strip()}") from exc


def describe(state: dict[str, Any]) -> list[str]:
    """Patroni's /cluster view for people: leader, timeline, each member's role, state,
    timeline and lag."""
    if "error" in state:
        return [f"patroni: {state['error']}"]
    members = state.get("members", [])
    leader = next((m for m in members if m["role"] == "leader"), None)
    lines = [f"patroni scope {state.get('scope', '?')}: leader "
             + (f"{leader['name']} (timeline {leader.get('timeline', '?')})" if leader
                else "NONE (no node accepts writes)")]
    for m in members:
        lag = m.get("lag")
        lines.append(f"  member {m['name']}  {m.get('host', '?')}:{m.get('port', '?')}  "
                     f"{m['role']}, {m['state']}, timeline {m.get('timeline', '?')}"
                     + (f", {lag} bytes behind" if lag not in (None, "unknown") and
                        m["role"] != "leader" else ""))
    return lines


HA_MARKER = "patroni.json"
"""In the cluster's folder: the HA ports, so every command finds a Patroni cluster as such."""


class PatroniCluster(Cluster):
    """The ledger's two local nodes under Patroni: the same DSNs and node folders as
    Cluster, but etcd and Patroni start, watch, promote and rewind them. `launch` runs
    etcd and Patroni (default: detached children; `tally up`: its supervisor)."""

    def __init__(self, spec: ClusterSpec, ha_ports: tuple[int, int, int, int],
                 scope: str = "tally-ledger", launch: Launch | None = None) -> None:
        super().__init__(spec)
        self.ha_ports = ha_ports
        self.scope = scope
        self.launch = launch

    @property
    def ha(self) -> HA:
        rest_a, rest_b, etcd_client, etcd_peer = self.ha_ports
        spec = HASpec(self.root, self.scope, NODES, tuple(self.spec.ports), (rest_a, rest_b),
                      (etcd_client, etcd_peer), host=self.spec.host, bin_dir=self.spec.bin_dir,
                      os_user=self.spec.os_user, parameters=dict(self.spec.extra_settings),
                      local_parameters=self.spec.archive_settings())
        return HA(spec, self.credentials())

    def initialized(self) -> bool:
        return self.credentials_file.exists() and (self.root / HA_MARKER).exists()

    def init(self) -> None:
        if self.root.exists() and any(self.root.iterdir()):
            raise ClusterError(f"{self.root} is not empty: a ledger cluster may exist there")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._close(self.root)  # its logs, configs and passwords are the platform's
            creds = {role: secrets.token_urlsafe(24)
                     for role in ("postgres", *ROLES, "patroni_api", "etcd_root", "etcd_tally")}
            self.credentials_file.touch(mode=0o600)
            self.credentials_file.write_text(json.dumps(creds, indent=1))
            (self.root / HA_MARKER).write_text(json.dumps({"scope": self.scope,
                                                           "ha_ports": self.ha_ports}))
            ha = self.ha
            ha.start(120, self.launch)
            leader = ha.wait_leader(120)
            # Patroni made the superuser and the replication role; the rest are ours.
            self._create_roles(creds, leader, roles=tuple(r for r in ROLES
                                                          if r != "tally_replicator"),
                               slots=False)
            self._setup_roles(leader)
            ha.wait_members(len(NODES), 120)
        except BaseException:
            self.destroy()
            raise

    def start(self) -> None:
        self.require()
        self.ha.start(60, self.launch)
        self._setup_roles(self.writable_leader(60))

    def writable_leader(self, timeout: float) -> str:
        """The leader once it accepts writes: right after a restart Patroni may show a
        leader whose PostgreSQL is still in recovery (its promotion under way)."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.ha.wait_leader(max(deadline - time.monotonic(), 1))
            with contextlib.suppress(psycopg2.Error):
                if self._query(leader, "SELECT pg_is_in_recovery()") == [(False,)]:
                    return leader
            if time.monotonic() > deadline:
                raise ClusterError(f"leader {leader} still in recovery after {timeout:.0f}s")
            time.sleep(0.2)

    def stop(self) -> None:
        self.ha.stop()

    def start_node(self, node: str) -> None:
        ha = self.ha
        if self.launch is None:
            ha.start_process(f"patroni-{node}")
        else:
            self.launch(ha.processes())

    def stop_node(self, node: str, mode: str = "fast") -> None:
        """Stop the node's Patroni, which stops its PostgreSQL (`immediate`: kill both)."""
        ha = self.ha
        if mode == "immediate":
            ha.signal(f"patroni-{node}", signal.SIGKILL)
            with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                os.kill(self.postmaster_pid(node), signal.SIGKILL)
            return
        ha.signal(f"patroni-{node}", signal.SIGTERM)
        deadline = time.monotonic() + 60
        while (ha.pid(f"patroni-{node}") or self._running(node)) and time.monotonic() < deadline:
            time.sleep(0.1)

    def primary(self) -> str:
        leader = self.ha.leader()
        if leader is None:
            raise ClusterError("no Patroni leader: see `tally ledger status`")
        return leader

    def promote(self, node: str | None = None) -> str:
        """A switchover by Patroni to `node` (default: the synchronous standby)."""
        return self.ha.switchover(node)

    def rejoin(self, node: str) -> None:
        """Patroni rejoins a former primary by itself (pg_rewind); this asks it to rebuild
        the replica from the leader instead (reinit)."""
        self.ha.reinit(node)

    def state(self) -> dict[str, Any]:
        """Patroni's view: leader, members (role, state, timeline, lag)."""
        return self.ha.cluster_state()

    def destroy(self) -> None:
        if self.credentials_file.exists():
            ha = self.ha
            for process in ha.processes():
                ha.signal(process.name, signal.SIGKILL)
            for node in NODES:
                with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                    os.kill(self.postmaster_pid(node), signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def ledger_cluster(spec: ClusterSpec, ha_ports: tuple[int, int, int, int] | None,
                   new_ha: bool = True, scope: str = "tally-ledger",
                   kind: Callable[..., PatroniCluster] = PatroniCluster) -> Cluster:
    """The cluster in spec.data_dir as it was made: under Patroni if its folder says so
    (with the REST and etcd ports it was made with); a new one under Patroni if `new_ha`,
    on `ha_ports` or, if None, on ports free now; else plain (the tests' fixture). `scope`
    and `kind` (a PatroniCluster subclass's maker) serve the apps' cluster
    (agents/appsdb.py)."""
    root = spec.data_dir.resolve()
    marker = root / HA_MARKER
    if marker.exists():
        saved = json.loads(marker.read_text())
        return kind(spec, tuple(saved["ha_ports"]), saved["scope"])
    plain = Cluster(spec)
    if plain.initialized() or not new_ha:
        return plain
    return kind(spec, ha_ports or _free_ports(4), scope)


def _free_ports(n: int) -> tuple[int, int, int, int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        a, b, c, d = (s.getsockname()[1] for s in socks)
        return a, b, c, d
    finally:
        for s in socks:
            s.close()
