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
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
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
    an agent refuses a uid another app's user holds (agents/users.py). Every ledger a test
    makes takes one too (`make_cluster`, `tally_env`): a ledger hands out its block from the
    first uid, and the users of another ledger's apps stay on the machine meanwhile. Under
    pytest-xdist each worker draws from blocks of its own (their number modulo the
    workers'), and no session draws a block twice: a draw at random among all of them
    would give two of the run's ledgers the same block now and then."""
    workers, index = _xdist_worker()
    while True:
        block = random.randrange(1_000, 2_000_000)
        block += index - block % workers
        if block >= 1_000 and block not in _UID_DRAWN:
            _UID_DRAWN.add(block)
            return f"{block * 1_000}-{block * 1_000 + 999}"


_UID_DRAWN: set[int] = set()


def _xdist_worker() -> tuple[int, int]:
    """(workers, this one's index) under pytest-xdist; (1, 0) in a plain run."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    return max(workers, 1), index


def user_prefix() -> str:
    """A prefix of this session's own for its apps' Unix users (TALLY_APP_USER_PREFIX):
    user names are machine-wide, and tests name their apps alike (hello, blog, crasher), so
    sessions side by side (pytest-xdist's workers, other runs) would otherwise each take
    the other's `tally-blog` for an earlier app of its own and remove it."""
    return "ts" + "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=5)) + "-"


def _session_own(name: str, make: Callable[[], str]) -> str:
    """os.environ[name], made for this session unless the environment set it. A pytest-xdist
    worker starts with its controller's environment, so a value the controller made (named
    in TALLY_TESTS_MADE) is made again in each worker: each worker is a session of its own."""
    made = set(filter(None, os.environ.get("TALLY_TESTS_MADE", "").split(",")))
    if name not in os.environ or (name in made and "PYTEST_XDIST_WORKER" in os.environ):
        os.environ[name] = make()
        os.environ["TALLY_TESTS_MADE"] = ",".join(sorted(made | {name}))
    return os.environ[name]


SESSION_UIDS = _session_own("TALLY_APP_UIDS", uid_block)
USER_PREFIX = _session_own("TALLY_APP_USER_PREFIX", user_prefix)


def session_uids() -> tuple[int, int]:
    """The session ledger's uid block, for an API made in the test's process (Settings):
    the default range (200000-299999) is every other session's too."""
    first, _, end = SESSION_UIDS.partition("-")
    return int(first), int(end)


def app_user(app: str) -> str:
    """The Unix user this session's agents make for `app`."""
    return user_name(app, USER_PREFIX)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Heavy files first. Under pytest-xdist (`make test`: `--dist loadfile
    --no-loadscope-reorder`) each test file runs whole on one worker, in order (its module
    fixtures, a platform or a Patroni cluster, made once, as in a plain run), and files
    are handed out in this order: the longest ones do not start last and leave the other
    workers idle at the end. (Not `--dist loadgroup`: with pytest 9 its group suffix never
    reaches the scheduler, and every test is scheduled on its own.)"""
    items.sort(key=lambda item: HEAVY_FIRST.get(_file(item), len(HEAVY_FIRST)))


def _file(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


HEAVY_FIRST = {f"tests/{name}.py": i for i, name in enumerate([
    "integration/test_isolation", "integration/test_builder", "integration/test_runs",
    "integration/test_backups", "e2e/test_cli_deploy", "integration/test_api_permissions",
    "integration/test_ha", "e2e/test_fleet", "integration/test_replication",
    "integration/test_projectors", "integration/test_isolation_limits",
    "integration/test_api_schemathesis", "integration/test_balancer_api",
    "integration/test_addons", "integration/test_balancer", "integration/test_appsdb",
    "e2e/test_up_addons", "e2e/test_up",
])}
"""The test files that take longest (each 100-900 s of a worker's time in a whole run on
this machine), longest first; the rest keep their order after them."""


def _port_slice() -> range:
    """The ports this session hands out: below the kernel's ephemeral range (32768 up), so
    no outgoing connection takes one between the test picking it and a server binding it,
    and under pytest-xdist a slice per worker, so two workers never pick the same one."""
    low, high = 20000, 32768
    workers, index = _xdist_worker()
    size = (high - low) // workers
    return range(low + index * size, low + (index + 1) * size)


PORTS = _port_slice()
_handed: set[int] = set()
"""Ports handed out in this session: not handed again while others are free. A port a
fixture holds for minutes (a killed agent's range, a primary killed to be restarted on its
port) is free for a while, and must not go to another server meanwhile."""


def _free_run(n: int, attempts: int = 500) -> int:
    """The first of n consecutive ports of this session's slice, free now, none handed out
    before (or, once the slice has no such run left, free now)."""
    for fresh in (True, False):
        for _ in range(attempts):
            low = random.randrange(PORTS.start, PORTS.stop - n)
            run = range(low, low + n)
            if fresh and _handed.intersection(run):
                continue
            if _bindable(run):
                _handed.update(run)
                return low
    raise RuntimeError(f"no {n} consecutive free ports found in {PORTS}")


def _bindable(run: range) -> bool:
    socks = []
    try:
        for port in run:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", port))
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()
    return True


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on 127.0.0.1 right now (see _port_slice)."""
    return [_free_run(1) for _ in range(n)]


def free_port_range(n: int) -> tuple[int, int]:
    """n consecutive TCP ports free on 127.0.0.1 right now (an agent's app port range)."""
    low = _free_run(n)
    return low, low + n - 1


TEST_HOMES = Path("/var/lib/tally-tests")
"""Where test clusters (and the homes beside them) are made: not under /tmp, which apps
see a private one of (agents/runtime.py), since tests ask whether the platform's modes,
not a mount, shut an app out of them."""


def build_dir(home: Path) -> Path:
    """The builders' folder of a test home (TALLY_BUILD_DIR): beside it, not in it (the
    builder refuses a build folder inside TALLY_HOME), and not the default under
    /var/lib/tally-builds, which nothing of the tests would ever remove."""
    return home.with_name(home.name + "-build")


def remove_home(home: Path) -> None:
    """A test home and its builders' folder (builds, caches: tens of MB a home)."""
    for path in (home, build_dir(home)):
        shutil.rmtree(path, ignore_errors=True)


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
        "TALLY_BUILD_DIR": str(build_dir(home)),
        "TALLY_APP_UIDS": uid_block(),
    }


def listening_ports(addresses: tuple[str, ...]) -> list[int]:
    """The ports of HOST:PORT addresses (Config.balancers, balancers_tls)."""
    return [int(a.rpartition(":")[2]) for a in addresses]


_UID_BLOCKS: dict[Path, str] = {}
"""Each test ledger's uid block (its APIs' TALLY_APP_UIDS, by the ledger's root)."""


def make_cluster(uids: str | None = None) -> Cluster:
    """A fresh migrated cluster in a temporary folder the postgres user can reach, with a
    uid block of its own (`uids`, or a new one) that `tally_env` hands its APIs."""
    TEST_HOMES.mkdir(mode=0o755, parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="tally-test-", dir=TEST_HOMES))
    root.chmod(0o755)
    a, b = free_ports(2)
    cluster = Cluster(ClusterSpec(root / "ledger", ports=(a, b)))
    _UID_BLOCKS[cluster.root] = uids or uid_block()
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
    remove_home(cluster.root.parent)


def on_node(cluster: Cluster, node: str, sql: str, args: tuple = ()) -> list[tuple]:
    """One statement on one node of `cluster` as its superuser, committed at once; the
    rows, if it returns any."""
    conn = psycopg2.connect(cluster.node_dsn(node))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def addons_answer(database_url: str, redis_url: str) -> bool:
    """The app's PostgreSQL and Redis add-ons both answer at their URLs."""
    import redis

    try:
        psycopg2.connect(database_url, connect_timeout=2).close()
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (psycopg2.Error, redis.RedisError):
        return False


def tally_env(cluster: Cluster, **extra: str) -> dict[str, str]:
    """Environment for a `tally` subprocess pointed at this test cluster."""
    return {
        **os.environ,
        "TALLY_HOME": str(cluster.root.parent),
        "TALLY_LEDGER_PORTS": ",".join(str(p) for p in cluster.spec.ports),
        "TALLY_APP_UIDS": _UID_BLOCKS.get(cluster.root, SESSION_UIDS),
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
    c = make_cluster(SESSION_UIDS)
    yield c
    destroy_cluster(c)


@pytest.fixture(scope="module")
def private() -> Iterator[Cluster]:
    """A ledger cluster of the test module's own: for tests whose daemons act on everything
    in their ledger (placers, agents, projectors writing views), which the session cluster
    shares. A module that needs a fresh one per test declares its own."""
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
