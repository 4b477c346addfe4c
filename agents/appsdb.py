"""The apps' PostgreSQL cluster: two nodes under Patroni (scope `tally-apps`, its own etcd,
never the ledger's nodes) behind one HAProxy that follows the primary, as Patroni's
documentation shows. Apps get a standard single-host DATABASE_URL naming HAProxy's port:
dj-database-url, SQLAlchemy, psycopg and Rails parse it, and a failover costs an app its
open connections, never its URL.

HAProxy asks each node's Patroni REST API `GET /primary` (200 only on the running leader)
every 500 ms (250 ms while a state changes); two failures mark a node down and
`on-marked-down shutdown-sessions` closes the connections still going to it, so no app
keeps talking to a demoted node. It runs as the cluster's server user, like Patroni.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ledger.cluster import Cluster, ClusterSpec
from ledger.patroni import HA, HASpec, PatroniCluster, Process, ledger_cluster, writes_pid

SCOPE = "tally-apps"
PROXY_FILE = "proxy.json"
"""In the cluster's folder: the stable address's port, fixed when the cluster is made (apps'
URLs name it, so a later change of TALLY_APPS_DB_PORT must not move it)."""
PRIVATE_LOGS = {"log_min_error_statement": "panic", "log_error_verbosity": "terse"}
"""A tenant's failed statement (its data) never reaches the server's log."""


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
    """Patroni + etcd, and HAProxy started and stopped with them."""

    def __init__(self, spec: HASpec, credentials: dict[str, str], proxy_port: int) -> None:
        super().__init__(spec, credentials)
        self.proxy_port = proxy_port

    @property
    def haproxy_file(self) -> Path:
        return self.run_dir / "haproxy.cfg"

    def write_configs(self) -> None:
        super().write_configs()
        self.haproxy_file.touch(mode=0o600)
        self.haproxy_file.write_text(haproxy_config(self.spec, self.proxy_port))
        self._chown(self.haproxy_file)

    def processes(self) -> list[Process]:
        """etcd and Patroni, then HAProxy (stopped before etcd, as the nodes are)."""
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        etcd, *rest = super().processes()
        argv = writes_pid(self.pid_file("haproxy"), [haproxy, "-db", "-f",
                                                     str(self.haproxy_file)])
        return [etcd, *rest, Process("haproxy", argv, etcd.user, {})]


class AppsCluster(PatroniCluster):
    """The apps' cluster under Patroni, reached at one stable address (HAProxy)."""

    def __init__(self, spec: ClusterSpec, ha_ports: tuple[int, int, int, int],
                 scope: str = SCOPE, proxy_port: int = 5445) -> None:
        super().__init__(spec, ha_ports, scope)
        saved = self.root / PROXY_FILE
        self.proxy_port = json.loads(saved.read_text())["port"] if saved.exists() else proxy_port

    @property
    def ha(self) -> HA:
        base = super().ha
        return ProxiedHA(base.spec, base.secrets, self.proxy_port)

    def init(self) -> None:
        super().init()
        (self.root / PROXY_FILE).write_text(json.dumps({"port": self.proxy_port}))
        self._close(self.root)

    def start(self) -> None:
        super().start()
        self._close(self.root)  # Patroni's init leaves it open: logs and configs are ours

    def address(self) -> tuple[str, int]:
        return self.spec.host, self.proxy_port


def apps_cluster(root: Path, ports: tuple[int, int], proxy_port: int, bin_dir: Path,
                 ha: bool, ha_ports: tuple[int, int, int, int] | None = None) -> Cluster:
    """The apps' cluster in `root` as it was made (an existing plain one stays plain); a
    new one under Patroni unless `ha` is False (then a plain primary + standby, reached at
    its primary's own port: for tests and machines without Patroni)."""
    spec = ClusterSpec(root, ports=ports, dbname="tally_apps", bin_dir=bin_dir, ledger=False,
                       extra_settings=dict(PRIVATE_LOGS))

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
