"""agents/binds.py: the kernel refuses a bind to a port of an agent's range to every uid
but root and the port's owner. Pure names, and the real program on a cgroup of this
machine's v2 hierarchy made for the test (only processes the test moves into it are
judged: the machine's other binds are not touched)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents import binds
from tests.conftest import free_port_range, free_ports


def test_program_names_say_the_agent_and_its_pid() -> None:
    mine = binds.program_name("tally-h1-abc", 4242)
    assert len(mine) <= 15 and binds.NAME.match(mine)
    before = binds.program_name("tally-h1-abc", 4000)  # this agent before a kill -9
    other_alive = binds.program_name("tally-h2-def", 4100)
    other_dead = binds.program_name("tally-h2-def", 4200)
    names = [mine, before, other_alive, other_dead, "not_ours", "tlyzzzzz12"]
    assert binds.stale(names, mine, lambda pid: pid != 4200) == [before, other_dead]


def test_the_program_is_whole_instructions() -> None:
    code = binds.program(map_fd=3, low=40000, high=40009)
    assert len(code) % 8 == 0 and len(code) // 8 == 21


@pytest.fixture
def cgroup() -> Iterator[Path]:
    if (reason := binds.missing()) is not None:
        pytest.skip(reason)
    root = binds.cgroup2_root(Path("/proc/self/mountinfo").read_text())
    assert root is not None
    path = root / f"tally-binds-test-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    yield path
    path.rmdir()


def bind_as(cgroup: Path, user: int, port: int, family: socket.AddressFamily,
            address: str) -> str:
    """A process moved into `cgroup`, become `user`, binds (SO_REUSEADDR, as servers do)."""
    code = f"""
import os, socket
with open({str(cgroup / "cgroup.procs")!r}, "w") as f:
    f.write(str(os.getpid()))
os.setuid({user})
s = socket.socket({int(family)}, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(({address!r}, {port}))
    print("bound")
except OSError as exc:
    print(exc.errno)
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


def test_only_root_and_the_owner_bind_a_port_of_the_range(cgroup: Path) -> None:
    low, _ = free_port_range(5)
    owner, other = 64000 + os.getpid() % 500, 64600 + os.getpid() % 300
    rule = binds.BindRule(f"test-{os.getpid()}-{time.monotonic_ns()}", low, low + 3, cgroup)
    try:
        rule.apply({low: owner, low + 1: owner, low + 99: other}, held={low + 2})
        v4, v6 = socket.AF_INET, socket.AF_INET6
        assert bind_as(cgroup, owner, low, v4, "127.0.0.1") == "bound"
        assert bind_as(cgroup, owner, low, v6, "::") == "bound"
        eperm = str(1)
        for port, family, address in [(low, v4, "0.0.0.0"), (low, v4, "127.0.0.2"),
                                      (low, v6, "::"), (low + 2, v4, "127.0.0.1")]:
            assert bind_as(cgroup, other, port, family, address) == eperm, (port, address)
        assert bind_as(cgroup, owner, low + 2, v4, "127.0.0.1") == eperm  # held: no app's
        assert bind_as(cgroup, 0, low + 2, v4, "127.0.0.1") == "bound"  # the agent's
        assert bind_as(cgroup, other, low + 3, v4, "127.0.0.1") == "bound"  # not ours: bound
        assert bind_as(cgroup, other, low + 4, v4, "127.0.0.1") == "bound"  # past the range
        rule.apply({low: other}, held={low + 1, low + 2})  # the placement moved: the map too
        assert bind_as(cgroup, other, low, v4, "127.0.0.1") == "bound"
        assert bind_as(cgroup, owner, low + 1, v4, "127.0.0.1") == eperm
    finally:
        rule.close()
    assert bind_as(cgroup, other, low + 2, v4, "127.0.0.1") == "bound"  # detached on close


def test_a_rule_outlives_its_agent_until_the_next_one_replaces_it(cgroup: Path) -> None:
    """An agent killed -9 leaves its program attached (the ports stay reserved); the next
    agent of that host attaches its own and detaches the old one."""
    low, root = free_ports(1)[0], f"test-{os.getpid()}-{time.monotonic_ns()}"
    owner, other = 64000 + os.getpid() % 500, 64600 + os.getpid() % 300
    old = binds.BindRule(root, low, low, cgroup, pid=os.getpid() + 1_000_000)
    old.apply({low: owner})
    for fd in [*old.progs.values(), old.map_fd, old.cgroup_fd]:
        os.close(fd)  # what kill -9 does to the agent's descriptors
    cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert bind_as(cgroup, other, low, socket.AF_INET, "127.0.0.1") == str(1)
        new = binds.BindRule(root, low, low, cgroup)
        try:
            new.apply({low: owner})
            names = [binds.program_by_id(i)[1] for i in binds.attached(cg, binds.INET4_BIND)]
            assert names == [new.name]
            assert bind_as(cgroup, other, low, socket.AF_INET, "127.0.0.1") == str(1)
        finally:
            new.close()
        assert binds.attached(cg, binds.INET4_BIND) == []
    finally:
        os.close(cg)
