"""Tenant isolation, part 2: one app cannot starve another or reach the platform.

Two tenants run real apps on real host agents (as root each app is its own Unix user); each
attack is tried from inside one tenant's processes, and each test asserts it fails and that
the other tenant's instance is unaffected. The hostile code is the processes' own command
(`python -c "$CODE"`, the code in a config var): it runs as the app, as any app's code would.
Where this machine's kernel refuses a mechanism, the test skips saying what is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agents import cgroups
from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from projectors import instances as instances_view
from projectors.runtime import Runner, catch_up, connect
from tests.conftest import destroy_cluster, free_ports, make_cluster, tally_env
from tests.fixtures.apps import app_tarball, store
from tests.fixtures.apps.fleet import AgentProc
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
class World:
    cluster: Cluster
    agent: AgentProc
    other: AgentProc
    ledger: Ledger
    digest: str
    victim_port: int
    victim: str = ""

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
            config: dict[str, str], sizes: dict[str, str] | None = None) -> None:
    ledger.append(f"app-{app}", [
        NewEvent("AppCreated", {"name": app, "owner": "ann"}),
        NewEvent("ConfigChanged", {"app": app, "set": config, "config_version": 1}),
        NewEvent("ReleaseCreated", {"app": app, "release": 1, "bundle_digest": digest,
                                    "procfile": procfile, "config_version": 1}),
        NewEvent("ScaleChanged", {"app": app, "scale": dict.fromkeys(procfile, 0),
                                  "sizes": sizes or {}})])


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    cluster = make_cluster()
    low, other_low = free_ports(2)
    agent = AgentProc(cluster, f"iso-{RUN}", (low, low + 9))
    other = AgentProc(cluster, f"iso2-{RUN}", (other_low, other_low + 4))
    agent.start()
    other.start()
    ledger = Ledger(cluster.dsn())
    try:
        digest = store(app_tarball("hello"), cluster.root.parent / "bundles")
        new_app(ledger, digest, EVIL, {"web": "gunicorn app:app", "hog": 'python -c "$HOG"',
                                       "trio": 'python -c "$TRIO"', "bomb": 'python -c "$BOMB"'},
                {"HOG": HOG, "TRIO": TRIO, "BOMB": BOMB})
        new_app(ledger, digest, VICTIM, {"web": "gunicorn app:app"}, {"GREETING": "fine"},
                sizes={"web": "standard-2x"})
        w = World(cluster, agent, other, ledger, digest, agent.ports[0] + 9)
        victim = w.place(VICTIM, "web", w.victim_port)
        wait_until(lambda: w.events(victim, "InstanceHealthy"), 240,
                   "the victim's instance healthy (the first run builds the virtualenv)")
        w.victim = victim
        yield w
    finally:
        for a in (agent, other):
            a.kill()
            a.kill_apps()
            _remove_groups(a)
        ledger.close()
        destroy_cluster(cluster)


def _remove_groups(agent: AgentProc) -> None:
    """The agent was killed -9: remove the cgroups it made (after killing what is in them)."""
    if cgroups_missing():
        return
    try:
        groups = cgroups.Cgroups.detect(cgroups.root_name(agent.host_id,
                                                           agent.home / "agents" / agent.host_id))
    except cgroups.Unavailable:
        return
    for root in groups.roots():
        for d in root.iterdir() if root.exists() else ():
            if d.is_dir():
                groups.kill_all(d.name)
    groups.close()


def group_file(pid: int, controller: str, name: str) -> str:
    """A file of the v1 `controller` group process `pid` is in."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return (Path("/sys/fs/cgroup") / controller / path.lstrip("/") / name).read_text()
    raise AssertionError(f"process {pid} has no {controller} group")


def instances_view_rows(world: World) -> dict[str, dict[str, Any]]:
    """The instances view (what `tally ps` shows), projected up to now."""
    dsn = world.cluster.dsn("tally_owner")
    conn = connect(dsn, "views", "test")
    try:
        runner = Runner(instances_view.PROJECTOR, conn)
        runner.start()
        catch_up([runner], world.ledger, world.ledger.sequence(), batch=1000)
        with conn.cursor() as cur:
            cur.execute("SELECT instance_id, state, signal, reason FROM views.instances")
            return {r[0]: {"state": r[1], "signal": r[2], "reason": r[3]}
                    for r in cur.fetchall()}
    finally:
        conn.close()


@pytest.fixture
def groups(world: World) -> World:
    """The world, where this machine lets agents make cgroups (else a skip saying why)."""
    if reason := cgroups_missing():
        pytest.skip(reason)
    return world


def victim_unaffected(world: World) -> None:
    assert world.victim_answers()
    assert world.events(world.victim, "InstanceExited") == []


# --- 1. limits ---------------------------------------------------------------------------------


def test_an_instance_past_its_memory_is_killed_and_ps_says_r15(groups: World) -> None:
    world = groups
    iid = world.place(EVIL, "hog", world.agent.ports[0] + 1)
    wait_until(lambda: world.events(iid, "InstanceExited"), 120, "the hog killed")
    exited = world.events(iid, "InstanceExited")[0].data
    assert exited["signal"] == 9
    assert exited["reason"].startswith("R15 (Memory quota vastly exceeded)"), exited
    assert "512 MiB" in exited["reason"]
    assert "survived" not in world.log(iid)
    row = instances_view_rows(world)[iid]
    assert row["reason"].startswith("R15") and row["signal"] == 9
    world.unplace(EVIL, iid)
    victim_unaffected(world)


def test_three_processes_share_one_memory_limit_and_the_log_says_r14(groups: World) -> None:
    world = groups
    iid = world.place(EVIL, "trio", world.agent.ports[0] + 2)
    wait_until(lambda: "codes:" in world.log(iid), 120, "the three children done")
    codes = [int(c) for c in re.findall(r"-?\d+", world.log(iid).split("codes:")[1]
                                        .splitlines()[0])]
    assert -9 in codes, world.log(iid)  # three of 300 MiB do not fit in 512 MiB
    wait_until(lambda: "Error R14 (Memory quota exceeded)" in world.log(iid), 60,
               "an R14 line in the instance's log (written on the agent's next stats round)")
    world.unplace(EVIL, iid)
    victim_unaffected(world)


def test_a_fork_bomb_stops_at_the_pids_limit_and_nothing_escapes_a_stop(groups: World) -> None:
    world = groups
    iid = world.place(EVIL, "bomb", world.agent.ports[0] + 3)
    wait_until(lambda: "started" in world.log(iid), 120, "the bomb stopped forking")
    started = int(re.search(r"started (\d+)", world.log(iid)).group(1))  # type: ignore[union-attr]
    assert started < 256, world.log(iid)  # standard-1x: 256 processes, not 2,000
    escaped = int(re.search(r"escaped (\d+)", world.log(iid)).group(1))  # type: ignore[union-attr]
    assert world.victim_answers()
    world.unplace(EVIL, iid)
    wait_until(lambda: world.events(iid, "InstanceStopped"), 60, "the bomb stopped")
    wait_until(lambda: not _alive(escaped), 10,
               "the process that left the instance's session killed with it")
    victim_unaffected(world)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_limits_follow_the_formation_size(groups: World) -> None:
    world = groups
    pid = world.agent.app_pids()[world.victim]
    assert int(group_file(pid, "memory", "memory.limit_in_bytes")) == 1024 * 2**20
    assert group_file(pid, "pids", "pids.max").strip() == "512"
    assert group_file(pid, "cpu", "cpu.shares").strip() == "2048"  # standard-2x: twice 1x
    root = cgroups.root_name(world.agent.host_id, world.home / "agents" / world.agent.host_id)
    assert f"/{root}/{world.victim}" in Path(f"/proc/{pid}/cgroup").read_text()


def test_a_one_off_run_is_confined_too(groups: World) -> None:
    world = groups
    code = ("import pathlib; print([l for l in pathlib.Path('/proc/self/cgroup').read_text()"
            ".splitlines() if ':pids:' in l][0])")
    out = wait_until(lambda: (r := subprocess.run(
        [sys.executable, "-m", "tally.cli", "run", EVIL, "--", "python", "-c", code],
        capture_output=True, text=True, env=tally_env(world.cluster), timeout=180)
    ).returncode == 0 and r, 120, "a one-off run")
    assert re.search(r":pids:/tally-iso2?-" + RUN + r"-[0-9a-f]{8}/" + EVIL + r"\.1\.run\.",
                     out.stdout), out.stdout
