"""The fleet end to end on this machine: relays, a placer and two host agents (different
host ids and port ranges) on a private ledger, running the sample apps over real HTTP.

Deploys are the events `tally deploy` appends (the bundle stored, ReleaseCreated); the rest
is the platform's own doing.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest

from agents.fleet import Fleet
from agents.placer import catch_up
from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from tests.conftest import (
    RelayProcs,
    app_user,
    destroy_cluster,
    free_port_range,
    make_cluster,
    tally_env,
)
from tests.fixtures.apps.fleet import (
    AgentProc,
    Daemon,
    api_for,
    create_app,
    placer,
    release,
    scale,
    set_config,
)
from tests.waiting import wait_until

TTL = 5.0


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@dataclass
class Platform:
    cluster: Cluster
    ledger: Ledger
    relays: RelayProcs
    placer: Daemon
    agents: dict[str, AgentProc]
    folded: Fleet = field(default_factory=Fleet)

    def fleet(self) -> Fleet:
        """The placer's model of the ledger, caught up now. Folded on from where the last
        call left off: a fresh fold of the whole ledger (heartbeats and all) at every poll
        of every wait loaded the very machine the tests wait on."""
        catch_up(self.ledger, self.folded)
        return self.folded

    def healthy(self, app: str, release: int | None = None) -> list[Any]:
        """The app's placed instances reported healthy (of one release, if given)."""
        f = self.fleet()
        return [p for p in f.placements_of(app) if f.instance(p.instance_id).state == "healthy"
                and (release is None or p.release == release)]

    def wait_healthy(self, app: str, count: int, release: int | None = None,
                     timeout: float = 120) -> list[Any]:
        def ready() -> list[Any] | None:
            f = self.fleet()
            placed = f.placements_of(app)
            ok = self.healthy(app, release)
            return ok if len(ok) == count == len(placed) else None

        return wait_until(ready, timeout, f"{count} healthy instances of {app}", interval=0.1)

    def app_processes(self) -> Counter:
        """Live app processes (gunicorn masters and the like) per host, from pid records."""
        return Counter({h: sum(1 for pid in a.app_pids().values() if psutil.pid_exists(pid))
                        for h, a in self.agents.items()})


def tally_why(platform: Platform, app: str) -> str:
    """`tally why APP` as an admin asks it: over the API (user commands speak only HTTP)."""
    from api.auth import create_user

    api = api_for(platform.cluster)
    token = create_user(platform.ledger, f"why-{os.urandom(4).hex()}", "admin")
    out = subprocess.run([sys.executable, "-m", "tally.cli", "why", app], capture_output=True,
                         text=True, env=tally_env(platform.cluster, TALLY_API=api.url,
                                                  TALLY_TOKEN=token), timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def get(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def platform() -> Iterator[Platform]:
    cluster = make_cluster()
    relays = RelayProcs(cluster)
    agents: dict[str, AgentProc] = {}
    try:
        relays.start(0)
        relays.start(1)
        low, _ = free_port_range(40)
        for i, host in enumerate(["h1", "h2"]):
            agents[host] = AgentProc(cluster, host, (low + 20 * i, low + 20 * i + 19),
                                     relays.endpoints)
            agents[host].start()
        the_placer = placer(cluster, relays.endpoints, ttl=TTL)
        the_placer.start()
        with Ledger(cluster.dsn()) as ledger:
            p = Platform(cluster, ledger, relays, the_placer, agents)
            wait_until(lambda: all(h in p.fleet().hosts and p.fleet().hosts[h].last_heartbeat
                                   for h in agents), 30, "both agents heartbeating")
            yield p
    finally:
        for a in agents.values():
            a.kill()
            a.kill_apps()
        if "the_placer" in locals():
            the_placer.kill()
        relays.stop()
        destroy_cluster(cluster)


def test_deploy_scale_roll_out_and_roll_back(platform: Platform) -> None:
    led, home = platform.ledger, platform.cluster.root.parent
    create_app(led, "hello", {"GREETING": "bonjour"})
    scale(led, "hello", web=2)
    release(led, home, "hello", "hello", 1, config_version=1)
    two = platform.wait_healthy("hello", 2, timeout=240)
    assert {p.host_id for p in two} == {"h1", "h2"}
    for p in two:
        body = get(p.port)
        assert (body["greeting"], body["instance"]) == ("bonjour", p.instance_id)

    scale(led, "hello", web=4)
    four = platform.wait_healthy("hello", 4)
    assert Counter(p.host_id for p in four) == {"h1": 2, "h2": 2}
    assert len({p.port for p in four}) == 4

    scale(led, "hello", web=0)
    wait_until(lambda: not platform.fleet().placements_of("hello")
               and sum(platform.app_processes().values()) == 0, 60, "everything stopped")

    scale(led, "hello", web=2)
    platform.wait_healthy("hello", 2, release=1)
    set_config(led, "hello", 2, GREETING="hallo")
    release(led, home, "hello", "hello", 2, config_version=2)
    new = platform.wait_healthy("hello", 2, release=2)
    assert {get(p.port)["greeting"] for p in new} == {"hallo"}
    wait_until(lambda: sum(platform.app_processes().values()) == 2, 60, "release 1 stopped")

    release(led, home, "hello", "hello", 3, config_version=1, rollback_of=1)
    back = platform.wait_healthy("hello", 2, release=3)
    assert {get(p.port)["greeting"] for p in back} == {"bonjour"}


def test_a_failing_release_phase_keeps_the_old_release_serving(platform: Platform) -> None:
    led, home = platform.ledger, platform.cluster.root.parent
    create_app(led, "migrating")
    scale(led, "migrating", web=1)
    release(led, home, "migrating", "migrating", 1)
    (web,) = platform.wait_healthy("migrating", 1, release=1)
    assert platform.fleet().apps["migrating"].phase_ok == {1}
    set_config(led, "migrating", 1, FAIL_RELEASE="1")
    release(led, home, "migrating", "migrating", 2, config_version=1)
    wait_until(lambda: 2 in platform.fleet().apps["migrating"].failed, 60, "release 2 failed")
    reason = platform.fleet().apps["migrating"].failed[2]
    assert "release phase exited with code 4" in reason and "table already exists" in reason
    assert get(web.port)["release"] == "1"
    assert [p.instance_id for p in platform.fleet().placements_of("migrating")] == [
        web.instance_id]
    why = tally_why(platform, "migrating")
    assert "release phase exited with code 4" in why, why


def test_a_crash_loop_is_reported_with_exit_codes(platform: Platform) -> None:
    led, home = platform.ledger, platform.cluster.root.parent
    create_app(led, "crasher")
    release(led, home, "crasher", "crasher", 1)

    def looping() -> str | None:
        return platform.fleet().apps["crasher"].failed.get(1)

    assert "crash-looping" in wait_until(looping, 60, "the crash loop reported")
    f = platform.fleet()
    (p,) = f.placements_of("crasher")  # kept placed: nothing older to serve instead
    assert f.instance(p.instance_id).exit_code == 3
    why = tally_why(platform, "crasher")
    assert "crash-looping" in why and "exit code 3" in why, why
    ran_on = platform.agents[p.host_id].home / "agents" / p.host_id
    assert (ran_on / "releases" / "crasher").is_dir()  # its slug, unpacked (HOME is /app)
    stale = ran_on / "releases" / "crasher" / ".unpack-killed"  # a killed agent's, hours ago
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = ran_on / "releases" / "crasher" / ".unpack-now"  # one that may be under way
    fresh.mkdir()
    wait_until(lambda: not stale.exists(), 30, "the stale unpacking removed")
    assert fresh.exists()
    led.append("app-crasher", [NewEvent("AppDeleted", {"name": "crasher"})])
    wait_until(lambda: not platform.fleet().placements_of("crasher"), 30, "crasher withdrawn")

    def left_nothing() -> bool:  # releases, home and (as root) the user of a deleted app
        folders = (ran_on / "releases" / "crasher", ran_on / "homes" / "crasher")
        return not any(f.exists() for f in folders) and not _user_exists(app_user("crasher"))

    wait_until(left_nothing, 30, "what crasher left on its host removed")


def test_a_killed_host_is_replaced_and_its_agent_comes_back_without_duplicates(
        platform: Platform) -> None:
    led = platform.ledger
    before = platform.wait_healthy("hello", 2)
    # Spread over both when both read alive at placing; under load one may have read as
    # suspect then and taken both: kill one that holds some.
    victim = "h1" if any(p.host_id == "h1" for p in before) else "h2"
    other = "h2" if victim == "h1" else "h1"
    agent = platform.agents[victim]
    agent.kill()
    agent.kill_apps()

    def moved() -> bool:
        f = platform.fleet()
        return f.hosts[victim].lost and len(platform.healthy("hello")) == 2 and all(
            p.host_id == other for p in f.placements_of("hello"))

    wait_until(lambda: platform.fleet().hosts[victim].lost, TTL + 10, f"{victim} lost")
    wait_until(moved, 120, f"hello healthy on {other}")  # its start: slow on a loaded host
    for p in platform.healthy("hello"):
        assert get(p.port)["greeting"] == "bonjour"

    agent.start()
    wait_until(lambda: not platform.fleet().hosts[victim].lost, 30, f"{victim} back")
    platform.wait_healthy("hello", 2)

    def one_process_per_placement() -> bool:
        live = {(h, iid) for h, a in platform.agents.items()
                for iid, pid in a.app_pids().items() if psutil.pid_exists(pid)}
        placed = {(p.host_id, p.instance_id) for p in platform.fleet().placements.values()}
        return live == placed

    wait_until(one_process_per_placement, 30, "exactly one process per placement")
    assert not any(psutil.pid_exists(pid) for pid in agent.app_pids().values())
    assert led.stream_version(f"host-{victim}") >= 2


def test_a_partitioned_host_stops_what_was_moved_away_when_it_returns(
        platform: Platform) -> None:
    led, home = platform.ledger, platform.cluster.root.parent
    create_app(led, "parted")
    scale(led, "parted", web=2)
    release(led, home, "parted", "hello", 1)
    before = platform.wait_healthy("parted", 2)
    # The placer spreads the two over both hosts when both are alive; under load one may
    # have read as suspect at that moment and taken both. Partition one that holds some.
    victim = "h2" if any(p.host_id == "h2" for p in before) else "h1"
    other = "h1" if victim == "h2" else "h2"
    stranded = {p.instance_id for p in before if p.host_id == victim}
    agent = platform.agents[victim]
    assert agent.proc is not None
    pids = {agent.app_pids()[iid] for iid in stranded}
    agent.proc.send_signal(signal.SIGSTOP)  # the agent falls silent; its apps keep running
    try:
        wait_until(lambda: platform.fleet().hosts[victim].lost, TTL + 10, f"{victim} lost")
        moved = platform.wait_healthy("parted", 2)
        assert {p.host_id for p in moved} == {other}
        assert all(psutil.pid_exists(pid) for pid in pids)  # still running, out of reach
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: not platform.fleet().hosts[victim].lost, 30, f"{victim} back")
    wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids), 30,
               "the stranded instances stopped")
    for iid in stranded:
        stopped = wait_until(lambda iid=iid: [e for e in led.read_stream(f"instance-{iid}")
                                              if e.type == "InstanceStopped"],
                             10, "its stop reported")
        assert stopped[-1].data["host_id"] == victim
