"""Tenant isolation, part 2: one app cannot starve another or reach the platform.

Two tenants run real apps on real host agents (as root each app is its own Unix user); each
attack is tried from inside one tenant's processes, and each test asserts it fails and that
the other tenant's instance is unaffected. The hostile code is the processes' own command
(`python -c "$CODE"`, the code in a config var): it runs as the app, as any app's code would.
Where this machine's kernel refuses a mechanism, the test skips saying what is missing.
"""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from agents import cgroups, netrules
from api.auth import create_user
from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from projectors import instances as instances_view
from projectors.runtime import Runner, catch_up, connect
from tests.api_process import ApiProcess, pack_files, project_now
from tests.conftest import destroy_cluster, free_port_range, free_ports, make_cluster, tally_env
from tests.fixtures.apps import app_tarball, store
from tests.fixtures.apps.fleet import AgentProc, Daemon, built, run_key
from tests.integration.test_api import (
    BUNDLE,
    world,  # noqa: F401  (the API with its users)
)
from tests.integration.test_api import World as ApiWorld
from tests.waiting import wait_until

RUN = uuid.uuid4().hex[:6]
EVIL, VICTIM = f"evil-{RUN}", f"victim-{RUN}"

HOG = ("x = b'a' * (700 * 2**20); print('survived 700 MiB', flush=True); "
       "import time; time.sleep(600)")
TRIO = """
import subprocess, sys, time
child = ("x = b'a' * (300 * 2**20); print('holding 300 MiB', flush=True); "
         "import time; time.sleep(20)")
procs = [subprocess.Popen([sys.executable, '-c', child]) for _ in range(3)]
print('codes:', [p.wait() for p in procs], flush=True)
time.sleep(600)
"""
BOMB = """
import os, subprocess, time
n = 0
escaped = subprocess.Popen(['sleep', '600'], start_new_session=True)
print('escaped', escaped.pid, flush=True)
kids = []
try:
    while n < 2000:
        kids.append(subprocess.Popen(['sleep', '600']))
        n += 1
except OSError as exc:
    print('refused after', n, type(exc).__name__, flush=True)
print('started', n, flush=True)
time.sleep(600)
"""
REACH = """
import os, socket, time
for item in os.environ['TARGETS'].split():
    name, port = item.split('=')
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect(('127.0.0.1', int(port)))
        print(name, 'open', flush=True)
    except OSError as exc:
        print(name, 'closed', exc.errno, flush=True)
    finally:
        s.close()
print('reach done', flush=True)
if os.environ.get('TALLY_INSTANCE', '').split('.')[2:3] == ['reach']:
    time.sleep(600)
"""
SQUAT = """
import os, socket, time
low, high = map(int, os.environ['RANGE'].split('-'))
held = []
for port in range(low, high + 1):
    for host in ('127.0.0.1', '0.0.0.0'):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen()
            held.append(f'{host}:{port}')
        except OSError:
            s.close()
print('squatted', len(held), held, flush=True)
time.sleep(600)
"""


def cgroups_missing() -> str | None:
    """What this machine lacks for per-app cgroups, or None."""
    if os.geteuid() != 0:
        return "not root: agents cannot make cgroups"
    layout = cgroups.parse_layout(Path("/proc/self/mountinfo").read_text(),
                                  Path("/proc/self/cgroup").read_text())
    if layout is None:
        return "no writable memory, pids and cpu cgroup v1 controllers on this machine"
    return None


@dataclass
class Site:
    cluster: Cluster
    agent: AgentProc
    other: AgentProc
    ledger: Ledger
    digest: str
    victim_port: int
    victim: str = ""
    targets: dict[str, int] = field(default_factory=dict)
    api: str = ""
    token: str = ""

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """`tally run -a EVIL -- argv` as its owner does it: through the API."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        env.update(TALLY_API=self.api, TALLY_TOKEN=self.token)
        return subprocess.run([sys.executable, "-m", "tally.cli", "run", "-a", EVIL, "--",
                               *argv], capture_output=True, text=True, env=env, timeout=180,
                              stdin=subprocess.DEVNULL)

    @property
    def home(self) -> Path:
        return self.cluster.root.parent

    def events(self, iid: str, type_: str) -> list[Any]:
        self.ledger.sequence()
        return [e for e in self.ledger.read_stream(f"instance-{iid}") if e.type == type_]

    def place(self, app: str, ptype: str, port: int, agent: AgentProc | None = None,
              release: int = 1) -> str:
        iid = f"{app}.{release}.{ptype}.{uuid.uuid4().hex[:6]}"
        self.ledger.append(f"placement-{app}", [NewEvent("InstancePlaced", {
            "instance_id": iid, "app": app, "release": release, "process_type": ptype,
            "host_id": (agent or self.agent).host_id, "port": port})])
        return iid

    def unplace(self, app: str, iid: str) -> None:
        self.ledger.append(f"placement-{app}", [NewEvent("InstanceUnplaced", {
            "instance_id": iid, "app": app, "reason": "test"})])

    def log(self, iid: str, agent: AgentProc | None = None) -> str:
        path = self.home / "agents" / (agent or self.agent).host_id / "logs" / f"{iid}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def victim_answers(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.victim_port}/", timeout=5) as r:
            return r.status == 200


def new_app(ledger: Ledger, digest: str, app: str, procfile: dict[str, str],
            config: dict[str, str], sizes: dict[str, str] | None = None,
            home: Path | None = None) -> None:
    """The app with release 1 of the sample (`digest`), built (w11: placed only once
    built; the slug is the sample's, built once per machine)."""
    result = ledger.append(f"app-{app}", [
        NewEvent("AppCreated", {"name": app, "owner": "ann"}),
        NewEvent("ConfigChanged", {"app": app, "set": config, "config_version": 1}),
        NewEvent("ReleaseCreated", {"app": app, "release": 1, "bundle_digest": digest,
                                    "procfile": procfile, "config_version": 1}),
        NewEvent("ScaleChanged", {"app": app, "scale": dict.fromkeys(procfile, 0),
                                  "sizes": sizes or {}})])
    assert home is not None
    built(ledger, home, app, 1, result.versions[2], app_tarball("hello"))


@pytest.fixture(scope="module")
def fleet() -> Iterator[Site]:
    cluster = make_cluster()
    (low, _), (other_low, _) = free_port_range(10), free_port_range(5)
    collector_port, api_port = free_ports(2)
    env = {"TALLY_RUN_KEY": run_key(cluster).hex(),
           "TALLY_COLLECTOR": f"tcp://127.0.0.1:{collector_port}"}
    daemons = [Daemon(cluster, "collector", ["collector"], **env),
               Daemon(cluster, "projectors", ["projectors", "--poll-interval", "0.2"])]
    agent = AgentProc(cluster, f"iso-{RUN}", (low, low + 9), collector=env["TALLY_COLLECTOR"],
                      env=env)
    other = AgentProc(cluster, f"iso2-{RUN}", (other_low, other_low + 4), env=env)
    api = ApiProcess(tally_env(cluster, **env), api_port)
    for d in (*daemons, agent, other):
        d.start()
    ledger = Ledger(cluster.dsn())
    try:
        api.wait_ready()
        token = create_user(ledger, "ann", "member")
        digest = store(app_tarball("hello"), cluster.root.parent / "bundles")
        new_app(ledger, digest, VICTIM, {"web": "gunicorn app:app"}, {"GREETING": "fine"},
                sizes={"web": "standard-2x"}, home=cluster.root.parent)
        site = Site(cluster, agent, other, ledger, digest, agent.ports[0] + 9)
        victim = site.place(VICTIM, "web", site.victim_port)
        wait_until(lambda: site.events(victim, "InstanceHealthy"), 240,
                   "the victim's instance healthy (the first run builds the virtualenv)")
        site.victim = victim
        site.api, site.token = api.url, token
        targets = {"own": agent.ports[0] + 4, "victim": site.victim_port,
                   "agent": _run_port(ledger, agent), "other-agent": _run_port(ledger, other),
                   "ledger-a": cluster.spec.ports[0], "ledger-b": cluster.spec.ports[1],
                   "collector": collector_port}
        site.targets = targets
        new_app(ledger, digest, EVIL, {
            "web": "gunicorn app:app", "hog": 'python -c "$HOG"', "trio": 'python -c "$TRIO"',
            "bomb": 'python -c "$BOMB"', "reach": 'python -c "$REACH"',
            "squat": 'python -c "$SQUAT"', "wide": "gunicorn --bind 0.0.0.0:$PORT -b [::]:$PORT "
            "app:app"},
            {"HOG": HOG, "TRIO": TRIO, "BOMB": BOMB, "REACH": REACH, "SQUAT": SQUAT,
             "TARGETS": " ".join(f"{k}={v}" for k, v in targets.items()),
             "RANGE": f"{low}-{low + 9}"}, home=cluster.root.parent)
        yield site
    finally:
        api.stop()
        for a in (agent, other):
            a.kill()  # its nftables table too
            a.kill_apps()  # its cgroups too
        for d in daemons:
            d.kill()
        ledger.close()
        destroy_cluster(cluster)


def _run_port(ledger: Ledger, agent: AgentProc) -> int:
    """The port of the agent's `tally run` endpoint, from its registration."""
    def registered() -> Any:
        events = ledger.read_stream(f"host-{agent.host_id}")
        return events and events[-1].data["run_endpoint"]
    endpoint = wait_until(registered, 60, f"agent {agent.host_id} registered")
    return int(endpoint.rsplit(":", 1)[1])


def group_file(pid: int, controller: str, name: str) -> str:
    """A file of the v1 `controller` group process `pid` is in."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return (Path("/sys/fs/cgroup") / controller / path.lstrip("/") / name).read_text()
    raise AssertionError(f"process {pid} has no {controller} group")


def instances_view_rows(site: Site) -> dict[str, dict[str, Any]]:
    """The instances view (what `tally ps` shows), projected up to now."""
    dsn = site.cluster.dsn("tally_owner")
    conn = connect(dsn, "views", "test")
    try:
        runner = Runner(instances_view.PROJECTOR, conn)
        runner.start()
        catch_up([runner], site.ledger, site.ledger.sequence(), batch=1000)
        with conn.cursor() as cur:
            cur.execute("SELECT instance_id, state, signal, reason FROM views.instances")
            return {r[0]: {"state": r[1], "signal": r[2], "reason": r[3]}
                    for r in cur.fetchall()}
    finally:
        conn.close()


@pytest.fixture
def groups(fleet: Site) -> Site:
    """The fleet, where this machine lets agents make cgroups (else a skip saying why)."""
    if reason := cgroups_missing():
        pytest.skip(reason)
    return fleet


def victim_unaffected(site: Site) -> None:
    assert site.victim_answers()
    assert site.events(site.victim, "InstanceExited") == []


# --- 1. limits ---------------------------------------------------------------------------------


def test_an_instance_past_its_memory_is_killed_and_ps_says_r15(groups: Site) -> None:
    site = groups
    iid = site.place(EVIL, "hog", site.agent.ports[0] + 1)
    wait_until(lambda: site.events(iid, "InstanceExited"), 120, "the hog killed")
    exited = site.events(iid, "InstanceExited")[0].data
    assert exited["signal"] == 9
    assert exited["reason"].startswith("R15 (Memory quota vastly exceeded)"), exited
    assert "512 MiB" in exited["reason"]
    assert "survived" not in site.log(iid)
    row = instances_view_rows(site)[iid]
    assert row["reason"].startswith("R15") and row["signal"] == 9
    site.unplace(EVIL, iid)
    victim_unaffected(site)


def test_three_processes_share_one_memory_limit_and_the_log_says_r14(groups: Site) -> None:
    site = groups
    iid = site.place(EVIL, "trio", site.agent.ports[0] + 2)
    wait_until(lambda: "codes:" in site.log(iid), 120, "the three children done")
    codes = [int(c) for c in re.findall(r"-?\d+", site.log(iid).split("codes:")[1]
                                        .splitlines()[0])]
    assert -9 in codes, site.log(iid)  # three of 300 MiB do not fit in 512 MiB
    wait_until(lambda: "Error R14 (Memory quota exceeded)" in site.log(iid), 60,
               "an R14 line in the instance's log (written on the agent's next stats round)")
    site.unplace(EVIL, iid)
    victim_unaffected(site)


def test_a_fork_bomb_stops_at_the_pids_limit_and_nothing_escapes_a_stop(groups: Site) -> None:
    site = groups
    iid = site.place(EVIL, "bomb", site.agent.ports[0] + 3)
    wait_until(lambda: "started" in site.log(iid), 120, "the bomb stopped forking")
    started = int(re.search(r"started (\d+)", site.log(iid)).group(1))  # type: ignore[union-attr]
    assert started < 256, site.log(iid)  # standard-1x: 256 processes, not 2,000
    escaped = int(re.search(r"escaped (\d+)", site.log(iid)).group(1))  # type: ignore[union-attr]
    assert site.victim_answers()
    site.unplace(EVIL, iid)
    wait_until(lambda: site.events(iid, "InstanceStopped"), 60, "the bomb stopped")
    wait_until(lambda: not _alive(escaped), 10,
               "the process that left the instance's session killed with it")
    victim_unaffected(site)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_limits_follow_the_formation_size(groups: Site) -> None:
    site = groups
    pid = site.agent.app_pids()[site.victim]
    assert int(group_file(pid, "memory", "memory.limit_in_bytes")) == 1024 * 2**20
    assert group_file(pid, "pids", "pids.max").strip() == "512"
    assert group_file(pid, "cpu", "cpu.shares").strip() == "2048"  # standard-2x: twice 1x
    root = cgroups.root_name(site.agent.host_id, site.home / "agents" / site.agent.host_id)
    assert f"/{root}/{site.victim}" in Path(f"/proc/{pid}/cgroup").read_text()


def test_a_one_off_run_is_confined_too(groups: Site) -> None:
    site = groups
    code = ("import pathlib; print([l for l in pathlib.Path('/proc/self/cgroup').read_text()"
            ".splitlines() if ':pids:' in l][0])")
    out = wait_until(lambda: (r := site.run("python", "-c", code)).returncode == 0 and r, 120,
                     "a one-off run (once the views know the hosts)")
    assert re.search(r":pids:/tally-iso2?-" + RUN + r"-[0-9a-f]{8}/" + EVIL + r"\.1\.run\.",
                     out.stdout), out.stdout


# --- 2. quotas (through the API; `world` is tests/integration/test_api.py's) -------------------


def _scale(api: ApiWorld, app: str, scale: dict[str, int],
           sizes: dict[str, str] | None = None) -> Any:
    return api.call("owner", "POST", f"/apps/{app}/scale", {"scale": scale,
                                                            "sizes": sizes or {}})


def _quota(api: ApiWorld, path: str, **limits: int | None) -> None:
    r = api.call("admin", "PUT", path, limits)
    assert r.status_code == 200, r.get_json()


def test_scaling_past_the_app_quota_is_refused_naming_it(world: ApiWorld) -> None:  # noqa: F811
    app = world.new_app()
    r = _scale(world, app, {"web": 1000})
    assert r.status_code == 422, r.get_json()
    assert r.get_json()["error"] == "quota_exceeded" and r.get_json()["quota"] == "instances"
    assert "50 instances" in r.get_json()["message"]
    assert world.call("owner", "GET", f"/apps/{app}").get_json()["scale"] == {"web": 1}


def test_a_users_apps_together_stay_within_the_users_quota(world: ApiWorld) -> None:  # noqa: F811
    first, second = world.new_app(), world.new_app()
    owner = world.names["owner"]
    used = world.call("owner", "GET", f"/quotas/users/{owner}").get_json()["used"]["instances"]
    assert used >= 2  # each app runs web=1
    _quota(world, f"/quotas/users/{owner}", instances=used + 1)
    assert _scale(world, first, {"web": 2}).status_code == 200
    r = _scale(world, second, {"web": 2})  # one more than the user's quota, though each
    assert r.status_code == 422 and r.get_json()["quota"] == "instances"  # app is within its
    assert f"user {owner}" in r.get_json()["message"]
    assert _scale(world, first, {"web": 1}).status_code == 200
    assert _scale(world, second, {"web": 2}).status_code == 200
    shown = world.call("owner", "GET", f"/quotas/users/{owner}").get_json()
    assert shown["limits"]["instances"] == used + 1 and shown["used"]["instances"] == used + 1
    _quota(world, f"/quotas/users/{owner}", instances=None)  # back to the default


def test_memory_quota_counts_sizes_and_scaling_down_always_works(world: ApiWorld) -> None:  # noqa: F811
    app = world.new_app()
    _quota(world, f"/quotas/apps/{app}", memory_mb=2048)
    assert _scale(world, app, {"web": 2}, {"web": "standard-2x"}).status_code == 200
    r = _scale(world, app, {"web": 3})  # 3 x 1 GiB
    assert r.status_code == 422 and r.get_json()["quota"] == "memory_mb", r.get_json()
    _quota(world, f"/quotas/apps/{app}", memory_mb=512)  # lowered below what it asks now
    assert _scale(world, app, {"web": 1}).status_code == 200  # down: allowed
    assert world.call("owner", "GET", f"/apps/{app}").get_json()["sizes"] == {
        "web": "standard-2x"}


def test_only_an_admin_sets_a_quota(world: ApiWorld) -> None:  # noqa: F811
    app = world.new_app()
    r = world.call("owner", "PUT", f"/quotas/apps/{app}", {"instances": 1000})
    assert r.status_code == 403
    r = world.call("owner", "PUT", f"/quotas/users/{world.names['owner']}", {"instances": 1000})
    assert r.status_code == 403
    assert world.call("other", "GET", f"/quotas/apps/{app}").status_code == 403
    assert world.call("owner", "GET", f"/quotas/apps/{app}").get_json()["limits"][
        "instances"] == 50


def _bomb(size: int) -> bytes:
    """A bundle with a file of `size` zero bytes: it compresses about a thousandfold."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("Procfile", b"web: gunicorn app:app"),
                           ("requirements.txt", b"flask\n"), ("zeros", bytes(size))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_bundles_past_the_apps_sizes_or_bombs_are_refused(world: ApiWorld) -> None:  # noqa: F811
    app = world.new_app()
    bomb = _bomb(64 << 20)
    assert len(bomb) < 200 << 10  # within the upload limit: only what it unpacks to tells
    r = world.call("owner", "POST", f"/apps/{app}/releases", data=bomb)
    assert r.status_code == 422 and "compression bomb" in r.get_json()["message"]
    _quota(world, f"/quotas/apps/{app}", unpacked_mb=1)
    r = world.call("owner", "POST", f"/apps/{app}/releases", data=_bomb(2 << 20))
    assert r.status_code == 422 and "unpacked-size limit" in r.get_json()["message"]
    _quota(world, f"/quotas/apps/{app}", bundle_mb=0)
    r = world.call("owner", "POST", f"/apps/{app}/releases", data=_bomb(1000))
    assert r.status_code == 413 and r.get_json()["quota"] == "bundle_mb"
    assert len(world.call("owner", "GET", f"/apps/{app}/releases").get_json()["releases"]) == 2


# --- 4. network reach, binding, squatting ------------------------------------------------------


@pytest.fixture
def rules(fleet: Site) -> Site:
    """The fleet, where agents can confine apps' connections (else a skip saying why)."""
    if reason := netrules.missing():
        pytest.skip(reason)
    return fleet


def _reached(output: str) -> dict[str, str]:
    return dict(re.findall(r"^(\S+) (open|closed)", output, re.M))


def test_an_app_reaches_only_its_own_ports_on_its_host_from_instances_and_runs(
        rules: Site) -> None:
    site = rules
    own = site.place(EVIL, "web", site.targets["own"])
    wait_until(lambda: site.events(own, "InstanceHealthy"), 120, "the app's own web instance")
    iid = site.place(EVIL, "reach", site.agent.ports[0] + 5)
    wait_until(lambda: "reach done" in site.log(iid), 120, "the app tried every port")
    expected = {name: "closed" for name in site.targets} | {"own": "open"}
    assert _reached(site.log(iid)) == expected, site.log(iid)
    run = site.run("python", "-c", REACH)
    assert _reached(run.stdout) == expected, (run.stdout, run.stderr)
    site.unplace(EVIL, iid)
    site.unplace(EVIL, own)
    victim_unaffected(site)


def _listening(pid: int) -> set[tuple[str, int]]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {(c.laddr.ip, c.laddr.port) for p in procs for c in p.net_connections("inet")
            if c.status == psutil.CONN_LISTEN}


def test_the_agent_binds_instances_whatever_the_procfile_says(fleet: Site) -> None:
    site = fleet
    port = site.agent.ports[0] + 6
    iid = site.place(EVIL, "wide", port)  # gunicorn --bind 0.0.0.0:$PORT -b [::]:$PORT
    wait_until(lambda: site.events(iid, "InstanceHealthy"), 120, "the wide instance running")
    pid = site.agent.app_pids()[iid]
    listening = wait_until(lambda: _listening(pid), 60, "gunicorn listening")
    assert listening == {("127.0.0.1", port)}  # not 0.0.0.0, not [::]
    site.unplace(EVIL, iid)
    wait_until(lambda: site.events(iid, "InstanceStopped"), 60, "the wide instance stopped")
    victim_unaffected(site)


def test_an_app_cannot_squat_the_ports_of_the_agents_range(fleet: Site) -> None:
    site = fleet
    low = site.agent.ports[0]
    iid = site.place(EVIL, "squat", low + 7)
    wait_until(lambda: "squatted" in site.log(iid), 120, "the squatter bound what it could")
    held = re.search(r"squatted \d+ (\[.*\])", site.log(iid)).group(1)  # type: ignore[union-attr]
    ports = {int(h.rsplit(":", 1)[1]) for h in ast.literal_eval(held)}
    assert ports <= {low + 7}, held  # its own port at most
    newcomer = site.place(VICTIM, "web", low + 8)
    wait_until(lambda: site.events(newcomer, "InstanceHealthy"), 120,
               "the other tenant's new instance healthy on a port of the range")
    assert site.events(newcomer, "InstanceExited") == []
    site.unplace(VICTIM, newcomer)
    site.unplace(EVIL, iid)
    victim_unaffected(site)


def test_a_deleted_apps_bundles_leave_the_store_unless_another_app_needs_them(
        world: ApiWorld) -> None:  # noqa: F811
    store_dir = world.client.application.extensions["tally"].settings.bundles_dir
    mine, theirs = world.new_app(releases=0), world.new_app(releases=0)
    own = {**BUNDLE, "app.py": f"app = '{uuid.uuid4().hex}'\n"}
    shared = {**BUNDLE, "app.py": f"app = '{uuid.uuid4().hex}'\n"}
    digests = {}
    for app, files in ((mine, own), (mine, shared), (theirs, shared)):
        r = world.call("owner", "POST", f"/apps/{app}/releases", data=pack_files(files))
        assert r.status_code == 201, r.get_json()
        digests[app, files["app.py"]] = r.get_json()["bundle_digest"]
    project_now(world.owner_dsn)
    paths = {what: store_dir / f"{d}.tar.gz" for what, d in digests.items()}
    hour_ago = time.time() - 3600  # past the grace for uploads whose release is not seen yet
    for p in paths.values():
        os.utime(p, (hour_ago, hour_ago))
    assert world.call("owner", "DELETE", f"/apps/{mine}").status_code == 204
    assert not paths[mine, own["app.py"]].exists()  # only the deleted app needed it
    assert paths[theirs, shared["app.py"]].exists()  # the other app's release needs it
