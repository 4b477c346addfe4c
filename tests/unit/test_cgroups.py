"""agents/cgroups.py: where the agent's groups are, what it writes for a size, how it reads
the kernel's OOM kills and what it says about them (pure); the v2 path on a fake tree and on
this kernel's real cgroup2 mount."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from agents.cgroups import oom_kills, parse_layout, r14, r15, root_name, settings
from ledger.sizes import SIZES, size_of

V1_MOUNTS = """\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
34 30 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_OWN = "8:pids:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n"
V2_MOUNTS = "40 25 0:35 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_v1_layout_is_the_agents_own_group_per_controller() -> None:
    layout = parse_layout(V1_MOUNTS, V1_OWN)
    assert layout is not None and layout.version == 1
    assert layout.dirs == {"memory": Path("/sys/fs/cgroup/memory/process_api/abc"),
                           "pids": Path("/sys/fs/cgroup/pids"),
                           "cpu": Path("/sys/fs/cgroup/cpu")}


def test_v2_layout_needs_the_controllers_delegated() -> None:
    own = "0::/system.slice/tally-agent.service\n"
    layout = parse_layout(V2_MOUNTS, own, "cpuset cpu io memory pids")
    assert layout is not None and layout.version == 2
    assert layout.dirs == {"": Path("/sys/fs/cgroup/system.slice/tally-agent.service")}
    assert parse_layout(V2_MOUNTS, own, "cpu io") is None  # no memory, no pids: no limits


def test_no_cgroups_at_all_is_said() -> None:
    assert parse_layout("", "") is None


def test_settings_follow_the_size() -> None:
    one, two = size_of("standard-1x"), size_of("standard-2x")
    assert settings(one, 1) == [("memory", "memory.limit_in_bytes", str(512 * 2**20)),
                                ("memory", "memory.memsw.limit_in_bytes", str(512 * 2**20)),
                                ("pids", "pids.max", "256"), ("cpu", "cpu.shares", "1024")]
    assert dict((f, v) for _, f, v in settings(two, 2)) == {
        "memory.max": str(1024 * 2**20), "memory.swap.max": "0", "pids.max": "512",
        "cpu.weight": "79"}


def test_unknown_or_missing_size_is_the_default() -> None:
    assert size_of(None) is SIZES["standard-1x"]
    assert size_of("enterprise-99x") is SIZES["standard-1x"]


def test_oom_kills_read_from_v1_and_v2_files() -> None:
    assert oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n") == 3
    assert oom_kills("low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n") == 2
    assert oom_kills("") == 0


def test_messages_name_the_limit_and_the_size() -> None:
    size = size_of("standard-1x")
    assert r15(size).startswith("R15 (Memory quota vastly exceeded)")
    assert "512 MiB" in r15(size) and "standard-1x" in r15(size)
    assert r14(size, 2).startswith("Error R14 (Memory quota exceeded)")
    assert "killed 2 process" in r14(size, 2)


def test_root_names_differ_per_agent_and_stay_across_restarts(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert root_name("h1", a) == root_name("h1", a)
    assert len({root_name("h1", a), root_name("h1", b), root_name("h2", a)}) == 3


def test_the_v2_path_writes_and_reads_the_unified_files(tmp_path: Path) -> None:
    """cgroup v2 runs nowhere on this machine (its controllers are all v1), so the v2 path
    runs here on a fake cgroupfs: a plain folder standing for the unified mount. What it
    proves: the folders, every file written (subtree_control, limits, cgroup.procs) and
    read (memory.events, cgroup.procs), and the R14 verdict, in v2's names. What it cannot:
    that a real kernel accepts them, and removing a group (a real cgroup folder is removed
    with its interface files in it, a plain one is not)."""
    import os

    from agents.cgroups import Cgroups, entering, watch

    mounts = f"40 25 0:35 / {tmp_path} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    layout = parse_layout(mounts, "0::/system.slice/tally-agent.service\n",
                          "cpuset cpu io memory pids")
    assert layout is not None and layout.version == 2
    agent = tmp_path / "system.slice" / "tally-agent.service"
    agent.mkdir(parents=True)
    for name, text in (("cgroup.controllers", "cpuset cpu io memory pids"),
                       ("cgroup.subtree_control", ""), ("cgroup.type", "domain"),
                       ("cgroup.procs", f"{os.getpid()}\n")):
        (agent / name).write_text(text)  # the agent's own group, as systemd delegates it
    groups = Cgroups(layout, "tally-h1-0a1b2c3d")
    groups.make_roots()
    assert (agent / "agent" / "cgroup.procs").read_text() == str(os.getpid())  # a leaf
    assert (agent / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    root = agent / "tally-h1-0a1b2c3d"
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    instance = root / "blog.1.web.a"
    instance.mkdir()
    for name in ("memory.max", "memory.swap.max", "pids.max", "cpu.weight", "cgroup.procs"):
        (instance / name).write_text("")  # the kernel makes these with the folder
    (instance / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
    size = size_of("standard-2x")
    assert groups.prepare("blog.1.web.a", size) == [instance]
    assert {n: (instance / n).read_text() for n in
            ("memory.max", "memory.swap.max", "pids.max", "cpu.weight")} == {
        "memory.max": str(size.memory_bytes), "memory.swap.max": "0",
        "pids.max": str(size.pids), "cpu.weight": "79"}
    enter = entering([instance], None)
    assert enter is not None
    enter()  # what the child runs before exec: its pid into the group
    assert groups.pids("blog.1.web.a") == [os.getpid()]
    assert watch(groups, "blog.1.web.a", "standard-2x", lambda: True) is None
    (instance / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 3\noom_kill 2\n")
    assert watch(groups, "blog.1.web.a", "standard-2x", lambda: True) == r14(size, 2)
    assert watch(groups, "blog.1.web.a", "standard-2x", lambda: True) is None  # once


def test_a_kill_that_took_the_leader_is_its_exits_r15_not_an_r14_line(tmp_path: Path) -> None:
    """The stats round may come between the kernel killing an instance's leader for its
    memory and the agent's look at the exit (under load, often): that kill is the exit's
    R15, not an R14 line of the stats round (the exit then had no reason; R15 test of
    test_isolation_limits failed so). A fake v2 cgroupfs, as above."""
    from agents.cgroups import Cgroups, watch

    mounts = f"40 25 0:35 / {tmp_path} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    layout = parse_layout(mounts, "0::/\n", "memory pids cpu")
    assert layout is not None
    groups = Cgroups(layout, "tally-h1-0a1b2c3d")
    instance = tmp_path / "tally-h1-0a1b2c3d" / "hog.1.web.a"
    instance.mkdir(parents=True)
    (instance / "memory.events").write_text("oom 0\noom_kill 0\n")
    groups.prepare("hog.1.web.a", size_of("standard-1x"))
    (instance / "memory.events").write_text("oom 1\noom_kill 1\n")
    leader = [True]

    def runs() -> bool:  # asked after the kills were read: the leader died meanwhile
        (instance / "memory.events").write_text("oom 2\noom_kill 2\n")
        return leader.pop()

    assert watch(groups, "hog.1.web.a", "standard-1x", runs) == r14(size_of("standard-1x"), 1)
    assert watch(groups, "hog.1.web.a", "standard-1x", lambda: False) is None
    assert groups.new_kills("hog.1.web.a") == 1  # what `ended` says R15 for


V2_AGENT = """
import json, os, subprocess, sys
from pathlib import Path

import pytest
from agents.cgroups import Cgroups, Layout, Unavailable, entering
from ledger.sizes import size_of

own, controller = Path(sys.argv[1]), sys.argv[2]
(own / "cgroup.procs").write_text(str(os.getpid()))  # started in its own group, as by systemd
groups = Cgroups(Layout(2, {"": own}), "tally-h1-0a1b2c3d", controllers=(controller,))
out = {}
try:
    groups.make_roots()
except Unavailable as exc:
    print(json.dumps({"refused": str(exc)}))
    sys.exit(0)
out["agent in"] = Path(f"/proc/{os.getpid()}/cgroup").read_text().splitlines()[-1]
dirs = groups.prepare("blog.1.web.a", size_of("standard-1x"))
child = subprocess.Popen(["sleep", "60"], preexec_fn=entering(dirs, None))
out["child"], out["pids"] = child.pid, groups.pids("blog.1.web.a")
groups.kill_all("blog.1.web.a")
child.wait(10)
out["removed"] = groups.remove("blog.1.web.a")
groups.close()
out["left"] = sorted(p.name for p in own.iterdir() if p.is_dir())
print(json.dumps(out))
"""


def test_the_v2_path_runs_on_this_kernels_unified_hierarchy(tmp_path: Path) -> None:
    """The v2 path on the real cgroup2 mount (here the hybrid `unified` one), with the one
    controller this kernel offers there (hugetlb: memory, pids and cpu are v1's on this
    machine, so their limit files cannot be written in v2 here; the fake tree above covers
    their names). A stand-in agent started in a group of its own moves into a leaf of it,
    enables the controller for its children, makes its root and an instance's group, a
    child enters it before exec, and killing and removing the group work as the kernel
    does them; a second process in the agent's group makes it refuse, saying why."""
    import json
    import os
    import subprocess
    import sys

    from agents.binds import cgroup2_root

    if os.geteuid() != 0:
        pytest.skip("needs root: cgroups are made by root")
    mount = cgroup2_root(Path("/proc/self/mountinfo").read_text())
    if mount is None:
        pytest.skip("no cgroup2 mount on this machine")
    offered = (mount / "cgroup.controllers").read_text().split()
    controller = next((c for c in ("memory", "pids", "hugetlb") if c in offered), None)
    if controller is None:
        pytest.skip(f"the cgroup2 mount offers no usable controller ({offered})")
    enabled = (mount / "cgroup.subtree_control").read_text().split()
    if controller not in enabled:
        (mount / "cgroup.subtree_control").write_text(f"+{controller}")
    own = mount / f"tally-v2-test-{os.getpid()}"
    own.mkdir()
    sitter = None
    try:
        run = [sys.executable, "-c", V2_AGENT, str(own), controller]
        got = json.loads(subprocess.run(run, capture_output=True, text=True, check=True,
                                        timeout=60).stdout)
        assert got["agent in"] == f"0::/{own.name}/agent", got
        assert got["pids"] == [got["child"]] and got["removed"] is True, got
        assert got["left"] == ["agent"], got  # its root removed at close; the leaf stays
        assert controller in (own / "cgroup.subtree_control").read_text().split()
        (own / "cgroup.subtree_control").write_text(f"-{controller}")
        (own / "agent").rmdir()
        sitter = subprocess.Popen(["sleep", "60"])  # another process in the agent's group
        (own / "cgroup.procs").write_text(str(sitter.pid))
        got = json.loads(subprocess.run(run, capture_output=True, text=True, check=True,
                                        timeout=60).stdout)
        assert "holds other processes too" in got["refused"], got
    finally:
        if sitter is not None:
            sitter.kill()
            sitter.wait()
        for leftover in sorted(own.rglob("*"), reverse=True):
            if leftover.is_dir():
                leftover.rmdir()
        own.rmdir()
        if controller not in enabled:
            with contextlib.suppress(OSError):
                (mount / "cgroup.subtree_control").write_text(f"-{controller}")
