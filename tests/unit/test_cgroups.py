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
