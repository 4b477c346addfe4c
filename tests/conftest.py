"""Shared fixtures: one throw-away ledger cluster (primary + synchronous standby) per test
session, and two relays in front of it. Never a developer's running cluster."""

from __future__ import annotations

import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import migrations
from agents.users import user_name
from ledger import Ledger, LedgerError, NewEvent
from ledger.cluster import Cluster, ClusterSpec
from ledger.subscriber import Subscriber
from tests.waiting import wait_until


def uid_block() -> str:
    """A block of app uids of its own (TALLY_APP_UIDS): sessions running side by side on
    one machine, each with its own ledger, would otherwise all hand out 200000 upward, and
    an agent refuses a uid another app's user holds (agents/users.py). A platform of a test's
    own (a ledger of its own, as `tally up` makes) takes one too: the session's block is
    already handed out by the session ledger's apps, whose users stay on the machine."""
    first = random.randrange(1_000, 2_000_000) * 1_000
    return f"{first}-{first + 999}"


os.environ.setdefault("TALLY_APP_UIDS", uid_block())


def user_prefix() -> str:
    """A prefix of this session's own for its apps' Unix users (TALLY_APP_USER_PREFIX):
    user names are machine-wide, and tests name their apps alike (hello, blog, crasher), so
    sessions side by side (pytest-xdist's workers, other runs) would otherwise each take
    the other's `tally-blog` for an earlier app of its own and remove it."""
    return "ts" + "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=5)) + "-"


os.environ.setdefault("TALLY_APP_USER_PREFIX", user_prefix())
USER_PREFIX = os.environ["TALLY_APP_USER_PREFIX"]


def app_user(app: str) -> str:
    """The Unix user this session's agents make for `app`."""
    return user_name(app, USER_PREFIX)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test`: `--dist loadgroup`), a test file's tests run on one
    worker, in order, so its module fixtures (a platform, a Patroni cluster, a build) are
    made once, as in a plain run; a test marked `xdist_group` joins that group instead.
    Heavy files go first, so the longest ones do not start last and leave the other
    workers idle at the end."""
    for item in items:
        if not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(_file(item)))
    items.sort(key=lambda item: HEAVY_FIRST.get(_file(item), len(HEAVY_FIRST)))


def _file(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


HEAVY_FIRST: dict[str, int] = {}
"""Test files by how long they take (longest first; the rest keep their order after)."""


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(n: int, attempts: int = 200) -> tuple[int, int]:
    """n consecutive TCP ports free on 127.0.0.1 right now (an agent's app port range),
    above the kernel's ephemeral range so no outgoing connection takes one meanwhile."""
    rng = random.Random()
    for _ in range(attempts):
        low = rng.randrange(20000, 32000 - n)
        socks = []
        try:
            for port in range(low, low + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return low, low + n - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


TEST_HOMES = Path("/var/lib/tally-tests")
"""Where test clusters (and the homes beside them) are made: not under /tmp, which apps
see a private one of (agents/runtime.py), since tests ask whether the platform's modes,
not a mount, shut an app out of them."""


def up_env(home: Path) -> dict[str, str]:
    """The environment of a `tally up` of a test's own in `home`: every address it takes
    on a port free now (none of `tally up`'s defaults, which a developer's platform or
    another test session's may hold), its own uid block, its own credentials file."""
    ports = free_ports(15)
    low, high = free_port_range(20)
    redis_low, redis_high = free_port_range(4)
    return {
        **os.environ, "TALLY_HOME": str(home),
        "TALLY_LEDGER_PORTS": f"{ports[0]},{ports[1]}",
        "TALLY_LEDGER_HA_PORTS": ",".join(str(p) for p in ports[2:6]),
        "TALLY_RELAYS": f"tcp://127.0.0.1:{ports[6]},tcp://127.0.0.1:{ports[7]}",
        "TALLY_API_BIND": f"127.0.0.1:{ports[8]}",
        "TALLY_COLLECTOR": f"tcp://127.0.0.1:{ports[9]}",
        "TALLY_APPS_DB_PORTS": f"{ports[10]},{ports[11]}", "TALLY_APPS_DB_PORT": str(ports[12]),
        "TALLY_REDIS_PORTS": f"{redis_low}-{redis_high}",
        "TALLY_AGENT_PORTS": f"{low}-{low + 9},{low + 10}-{high}",
        "TALLY_BALANCERS": f"127.0.0.1:{ports[13]},127.0.0.1:{ports[14]}",
        "TALLY_BALANCERS_TLS": ",".join(f"127.0.0.1:{p}" for p in free_ports(2)),
        "TALLY_CREDENTIALS": str(home / "credentials.json"),
        "TALLY_APP_UIDS": uid_block(),
    }


def listening_ports(addresses: tuple[str, ...]) -> list[int]:
    """The ports of HOST:PORT addresses (Config.balancers, balancers_tls)."""
    return [int(a.rpartition(":")[2]) for a in addresses]


def make_cluster() -> Cluster:
    """A fresh migrated cluster in a temporary folder the postgres user can reach."""
    TEST_HOMES.mkdir(mode=0o755, parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="tally-test-", dir=TEST_HOMES))
    root.chmod(0o755)
    a, b = free_ports(2)
    cluster = Cluster(ClusterSpec(root / "ledger", ports=(a, b)))
    cluster.init()
    migrations.upgrade(cluster.dsn("tally_owner"))
    return cluster


SESSION_APPS: set[str] = set()
"""Apps this test session created: their Unix users (made by the agents, as root) are
removed at the end of the session, and no one else's."""


def made_apps(cluster: Cluster) -> set[str]:
    """Every app ever created in this cluster's ledger (none if it does not answer)."""
    try:
        with Ledger(cluster.dsn(), retry_deadline=2) as ledger:
            return {e.data["name"] for e in ledger.read_all(types=["AppCreated"], limit=None)}
    except LedgerError:
        return set()


def destroy_cluster(cluster: Cluster) -> None:
    SESSION_APPS.update(made_apps(cluster))
    from tests.fixtures.apps.fleet import stop_api

    stop_api(cluster)  # the API agents shared, if one was started
    cluster.destroy()
    shutil.rmtree(cluster.root.parent, ignore_errors=True)


def tally_env(cluster: Cluster, **extra: str) -> dict[str, str]:
    """Environment for a `tally` subprocess pointed at this test cluster."""
    return {
        **os.environ,
        "TALLY_HOME": str(cluster.root.parent),
        "TALLY_LEDGER_PORTS": ",".join(str(p) for p in cluster.spec.ports),
        **extra,
    }


def _app_users() -> set[str]:
    return {u.pw_name for u in pwd.getpwall() if u.pw_name.startswith(USER_PREFIX)}


def session_users(before: set[str], now: set[str], apps: set[str]) -> set[str]:
    """The Unix users to remove: made during the session (absent `before`) for one of the
    session's own apps. Other test runs on this machine make users too, meanwhile: theirs
    stay, whatever their names look like."""
    return (now - before) & {app_user(app) for app in apps}


@pytest.fixture(scope="session", autouse=True)
def no_app_users_left() -> Iterator[None]:
    """Remove the Unix users that agents made for the session's apps (as root they make
    one per app), so runs do not pile them up in /etc/passwd. Only users of apps this
    session created; one whose process still runs stays (userdel refuses)."""
    before = _app_users()
    yield
    for name in sorted(session_users(before, _app_users(), SESSION_APPS)):
        subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    c = make_cluster()
    yield c
    destroy_cluster(c)


@pytest.fixture
def ledger(cluster: Cluster) -> Iterator[Ledger]:
    with Ledger(cluster.dsn()) as ledger:
        yield ledger


class RelayProcs:
    """Two `tally serve relay` subprocesses; tests may kill and restart them."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.endpoints = [f"tcp://127.0.0.1:{p}" for p in free_ports(2)]
        self.procs: list[subprocess.Popen | None] = [None, None]

    def start(self, i: int) -> None:
        with open(self.cluster.root.parent / f"relay-{i}.log", "ab") as log:
            self.procs[i] = subprocess.Popen(
                [sys.executable, "-m", "tally.cli", "serve", "relay", "--endpoint",
                 self.endpoints[i], "--poll-interval", "0.5"],
                env=tally_env(self.cluster), stdout=log, stderr=log,
            )

    def wait_ready(self, i: int, timeout: float = 20.0) -> None:
        """Until relay i publishes a head covering a fresh event."""
        sub = Subscriber([self.endpoints[i]])
        try:
            with Ledger(self.cluster.dsn()) as ledger:
                ledger.append("heartbeat-relay-probe",
                              [NewEvent("HostHeartbeat", {"host_id": "relay-probe"})])
                target = ledger.sequence()
            wait_until(lambda: sub.wait(0.2) is not None and sub.head >= target, timeout,
                       f"relay {i} never published")
        finally:
            sub.close()

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None:
            proc.kill()
            proc.wait()
            self.procs[i] = None

    def stop(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)


@pytest.fixture(scope="session")
def relays(cluster: Cluster) -> Iterator[RelayProcs]:
    procs = RelayProcs(cluster)
    procs.start(0)
    procs.start(1)
    for i in range(2):
        procs.wait_ready(i)
    yield procs
    procs.stop()
