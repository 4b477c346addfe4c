"""The pure half of agents/cgroups.py: where the agent's groups are, what it writes for a
size, how it reads the kernel's OOM kills and what it says about them."""

from __future__ import annotations

from pathlib import Path

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
    groups = Cgroups(layout, "tally-h1-0a1b2c3d")
    groups.make_roots()
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
    assert watch(groups, "blog.1.web.a", "standard-2x") is None
    (instance / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 3\noom_kill 2\n")
    assert watch(groups, "blog.1.web.a", "standard-2x") == r14(size, 2)
