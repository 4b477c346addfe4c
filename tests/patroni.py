"""A Patroni + etcd ledger cluster for the tests and benchmarks that fail it over
(tests/integration/test_ha.py, bench/failover.py): made the same way in both."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import migrations
from ledger.cluster import ClusterSpec
from ledger.patroni import PatroniCluster
from tests.conftest import free_ports
from tests.waiting import wait_until


def make_patroni_cluster(prefix: str = "tally-ha-") -> PatroniCluster:
    """Two PostgreSQL nodes under Patroni and one etcd, on free ports, schema upgraded."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    a, b, *others = free_ports(6)
    cluster = PatroniCluster(ClusterSpec(root / "ledger", ports=(a, b)), tuple(others))
    cluster.init()
    migrations.upgrade(cluster.dsn("tally_owner"))
    return cluster


def destroy_patroni_cluster(cluster: PatroniCluster) -> None:
    cluster.destroy()
    subprocess.run(["rm", "-rf", str(cluster.root.parent)], check=False)


def members(cluster: PatroniCluster) -> dict[str, dict]:
    return {m["name"]: m for m in cluster.state()["members"]}


def healthy(cluster: PatroniCluster, timeout: float = 120) -> str:
    """The leader, once one runs and the other node streams as its synchronous standby."""
    def ok() -> str | None:
        try:
            ms = members(cluster)
        except Exception:  # noqa: BLE001 (REST API restarting)
            return None
        leader = [n for n, m in ms.items() if m["role"] == "leader" and m["state"] == "running"]
        sync = [n for n, m in ms.items() if m["role"] == "sync_standby"
                and m["state"] == "streaming"]
        return leader[0] if leader and sync else None
    return wait_until(ok, timeout, "the cluster never had a leader and a sync standby")
