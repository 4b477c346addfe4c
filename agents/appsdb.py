"""The apps' PostgreSQL cluster: two nodes under Patroni (scope `tally-apps`, its own etcd,
never the ledger's nodes) behind one stable address that follows the primary. Apps get a
standard single-host DATABASE_URL naming that address: dj-database-url, SQLAlchemy,
psycopg and Rails parse it, and a failover costs an app its open connections, never its URL.

The stable address is one of two, chosen when the cluster is made (kept in proxy.json):
- "nat" (where the platform runs as root with nftables, as `tally up` does): a kernel
  destination NAT to the primary's port, repointed by a root watcher of Patroni's REST API
  (agents/dbroute.py). Packets go straight to PostgreSQL, so it costs what a direct
  connection costs.
- "haproxy" (elsewhere): Patroni's documented HAProxy, asking each node's REST API
  `GET /primary` every 500 ms (250 ms while a state changes); two failures mark a node
  down and `on-marked-down shutdown-sessions` closes the connections still going to it.
  It runs as the cluster's server user, like Patroni; each round trip pays its two socket
  hops (about half the select-only throughput on two busy cores).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from agents import dbroute
from ledger.cluster import Cluster, ClusterSpec, pid_alive
from ledger.errors import ClusterError
from ledger.files import write_for
from ledger.patroni import HA, HASpec, PatroniCluster, Process, ledger_cluster, writes_pid

SCOPE = "tally-apps"
PROXY_FILE = "proxy.json"
"""In the cluster's folder: the stable address's port and kind ("via": nat or haproxy),
fixed when the cluster is made (apps' URLs name the port, so a later change of
TALLY_APPS_DB_PORT must not move it)."""
SERVER_USER = "tally_appsdb"
"""The apps' cluster's OS user: not `postgres`, the ledger cluster's, so a compromise of one
server (an app's database role is a tenant's) reaches none of the other's files. An
underscore: never an app's user (agents/users.py names those tally-APP)."""
ROUTER = "router"
"""The NAT watcher's process name (agents/dbroute.py)."""


def default_via() -> str:
    """NAT where this process may write nftables rules (root with nft), else HAProxy."""
    return "nat" if os.geteuid() == 0 and shutil.which("nft") else "haproxy"
PRIVATE_LOGS = {"log_min_error_statement": "panic", "log_error_verbosity": "terse",
                "log_min_messages": "fatal"}
"""A tenant's failed statement (its data) never reaches the server's log, nor what it makes
the server say (`RAISE WARNING` of any size, errors quoting its data): the log is on the
platform's disk, unbounded, and a tenant must not be able to fill it. The server's own
fatal and panic lines remain; a tenant sees its warnings and errors on its connection."""


def haproxy_config(spec: HASpec, proxy_port: int) -> str:
    """HAProxy in TCP mode in front of the nodes, health-checked on Patroni's REST API."""
    servers = "\n".join(
        f"    server {name} {spec.host}:{pg} maxconn 300 check port {rest}"
        for name, pg, rest in zip(spec.names, spec.pg_ports, spec.rest_ports, strict=True))
    return f"""global
    maxconn 2000

defaults
    mode tcp
    retries 2
    timeout connect 3s
    timeout client 30m
    timeout server 30m
    timeout check 2s

listen primary
    bind {spec.host}:{proxy_port}
    option httpchk GET /primary
    http-check expect status 200
    default-server inter 500ms fastinter 250ms fall 2 rise 1 on-marked-down shutdown-sessions
{servers}
"""


class ProxiedHA(HA):
    """Patroni + etcd, and the stable address started and stopped with them: the NAT
    watcher (as root) or HAProxy (as the cluster's user)."""

    def __init__(self, spec: HASpec, credentials: dict[str, str], proxy_port: int,
                 via: str = "haproxy") -> None:
        super().__init__(spec, credentials)
        self.proxy_port = proxy_port
        self.via = via

    @property
    def haproxy_file(self) -> Path:
        return self.run_dir / "haproxy.cfg"

    @property
    def route_file(self) -> Path:
        """Root's (in the closed cluster folder, not the server user's run folder)."""
        return self.root / "route.json"

    def route(self) -> dbroute.Route:
        return dbroute.Route(dbroute.table_name(self.proxy_port), self.spec.host,
                             self.proxy_port, tuple(dbroute.Node(*n) for n in zip(
                                 self.spec.names, self.spec.pg_ports, self.spec.rest_ports,
                                 strict=True)), self.spec.os_user)

    def write_configs(self) -> None:
        super().write_configs()
        if self.via == "nat":
            self.route_file.touch(mode=0o600)
            self.route_file.write_text(self.route().to_json())
            return
        write_for(self.haproxy_file, haproxy_config(self.spec, self.proxy_port), self.spec.os_user)

    def processes(self) -> list[Process]:
        """etcd and Patroni, then the stable address (stopped before etcd, as the nodes
        are)."""
        etcd, *rest = super().processes()
        if self.via == "nat":
            argv = writes_pid(self.pid_file(ROUTER), [sys.executable, "-m", "agents.dbroute",
                                                       str(self.route_file)])
            return [etcd, *rest, Process(ROUTER, argv, None, {})]
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        argv = writes_pid(self.pid_file("haproxy"), [haproxy, "-db", "-f",
                                                     str(self.haproxy_file)])
        return [etcd, *rest, Process("haproxy", argv, etcd.user, {})]

    def pid_file(self, process: str) -> Path:
        if process == ROUTER:  # root's process: its pid file is not the server user's
            return self.root / f"{ROUTER}.pid"
        return super().pid_file(process)

    def pid(self, process: str) -> int | None:
        if process != ROUTER:
            return super().pid(process)
        try:
            pid = int(self.pid_file(process).read_text())
            return pid if pid_alive(pid) and psutil.Process(pid).uids().real == os.getuid() \
                else None
        except (FileNotFoundError, ValueError, psutil.Error):
            return None


class AppsCluster(PatroniCluster):
    """The apps' cluster under Patroni, reached at one stable address."""

    def __init__(self, spec: ClusterSpec, ha_ports: tuple[int, int, int, int],
                 scope: str = SCOPE, proxy_port: int = 5445, via: str | None = None) -> None:
        super().__init__(spec, ha_ports, scope)
        saved = self.root / PROXY_FILE
        known = json.loads(saved.read_text()) if saved.exists() else {}
        self.proxy_port = known.get("port", proxy_port)
        # A cluster made before the NAT existed keeps its HAProxy.
        self.via = known.get("via", "haproxy") if known else (via or default_via())

    @property
    def ha(self) -> HA:
        base = super().ha
        return ProxiedHA(base.spec, base.secrets, self.proxy_port, self.via)

    def init(self) -> None:
        ensure_server_user(self.spec.os_user)
        super().init()
        (self.root / PROXY_FILE).write_text(json.dumps({"port": self.proxy_port,
                                                        "via": self.via}))
        self._close(self.root)

    def start(self) -> None:
        super().start()
        self._close(self.root)  # Patroni's init leaves it open: logs and configs are ours

    def destroy(self) -> None:
        super().destroy()  # kills the watcher too: its table would outlive it
        if self.via == "nat":
            dbroute.remove(dbroute.table_name(self.proxy_port))

    def address(self) -> tuple[str, int]:
        return self.spec.host, self.proxy_port

    @property
    def address_process(self) -> str:
        """The name of the process that keeps the stable address (supervisord's
        `addons-NAME`)."""
        return ROUTER if self.via == "nat" else "haproxy"


def server_user(root: Path) -> str:
    """The OS user the apps' cluster in `root` runs as: its own (SERVER_USER), or for a
    cluster made before it had one, the owner of its first node's folder."""
    try:
        return pwd.getpwuid((root / "a").stat().st_uid).pw_name
    except (FileNotFoundError, KeyError):
        return SERVER_USER


def ensure_server_user(name: str, timeout: float = 30.0) -> None:
    """Create the cluster's OS user (a system user with its own group, no home, no shell)
    unless it exists; only root can, and only root needs one. Another process may be
    making it at the same moment (useradd then fails on /etc/passwd's lock): wait for it."""
    if os.geteuid() != 0:
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            pwd.getpwnam(name)
            return
        except KeyError:
            pass
        proc = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                               "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                               name], capture_output=True, text=True)
        if proc.returncode == 0:
            continue
        if time.monotonic() > deadline:
            raise ClusterError(f"cannot create the apps' cluster's user {name}: "
                               f"{proc.stderr.strip()}")
        time.sleep(0.2)


def apps_cluster(root: Path, ports: tuple[int, int], proxy_port: int, bin_dir: Path,
                 ha: bool, ha_ports: tuple[int, int, int, int] | None = None) -> Cluster:
    """The apps' cluster in `root` as it was made (an existing plain one stays plain); a
    new one under Patroni unless `ha` is False (then a plain primary + standby, reached at
    its primary's own port: for tests and machines without Patroni). It runs as its own OS
    user (server_user)."""
    spec = ClusterSpec(root, ports=ports, dbname="tally_apps", bin_dir=bin_dir, ledger=False,
                       extra_settings=dict(PRIVATE_LOGS), os_user=server_user(root))

    def make(spec: ClusterSpec, ports: tuple[int, int, int, int], scope: str) -> AppsCluster:
        return AppsCluster(spec, ports, scope, proxy_port)
    return ledger_cluster(spec, ha_ports, new_ha=ha, scope=SCOPE, kind=make)


def address(cluster: Cluster) -> tuple[str, int]:
    """Where apps reach the cluster: the stable address, or a plain cluster's primary."""
    if isinstance(cluster, AppsCluster):
        return cluster.address()
    return cluster.spec.host, cluster.port(cluster.primary())


def leader_postmaster(cluster: Cluster) -> int:
    """The pid of the primary's postmaster (tests and the benchmark kill it)."""
    return cluster.postmaster_pid(cluster.primary())
