"""Per-instance control groups: what one app's instance (or one-off run) may take from its
host, all its processes together, whatever they do: memory, processes, CPU weight, set from
its formation size (ledger/sizes.py). A per-process address-space limit does not stop three
700 MiB processes, nor a fork bomb; a cgroup does.

Layout: one folder per instance, `<agent's own cgroup>/<root>/<instance id>`, in each of the
memory, pids and cpu hierarchies (cgroup v1, as on this machine), or in the unified one
(cgroup v2, where a host has its controllers there). Under the agent's own cgroup, so
whatever limits the agent's supervisor set still hold for its apps; `<root>` is the host id
and a hash of the agent's state folder, so agents sharing a machine never share a folder and
a restarted agent finds its instances' groups again. An instance enters its groups in the
child before exec (`entering`), so nothing it forks is ever outside.

v1 is used where memory, pids and cpu are v1 hierarchies; else v2 where the unified
hierarchy offers them. v2 hands a controller to a group's children only if that group holds
no process itself: an agent whose own group does not hand them on yet moves into a leaf of
it (`agent`) and enables them, and refuses (apps then run without limits, said in its log
and by `tally up`) when they were not delegated to its group or other processes share it.
On this machine (hybrid: memory, pids and cpu are v1's, the unified hierarchy offers only
hugetlb) the v2 path runs for real with hugetlb in place of the three (its group handling,
delegation, entering, killing, removal), and its limit files only on a fake tree.

The kernel's OOM killer reports in the group (`oom_kill N` in v1 `memory.oom_control`, v2
`memory.events`): the agent turns a kill into Heroku-like messages, R14 in the instance's
log when it lives on, R15 as the reason of its exit (shown by `tally ps`).

The top half is pure (parsing, what to write, the verdicts), tested without I/O.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ledger.sizes import Size, size_of

log = logging.getLogger("tally.agent")
CONTROLLERS = ("memory", "pids", "cpu")


@dataclass(frozen=True)
class Layout:
    """Where this process's own groups are: per controller (v1) or one folder (v2)."""

    version: int
    dirs: dict[str, Path]


def parse_layout(mountinfo: str, own: str, v2_controllers: str = "") -> Layout | None:
    """The agent's own cgroup folders, from /proc/self/mountinfo and /proc/self/cgroup.
    v1 when memory, pids and cpu are each mounted as v1 hierarchies; else v2 when the
    unified hierarchy offers them (`v2_controllers`: its cgroup.controllers); else None."""
    v1_mounts: dict[str, Path] = {}
    v2_mount: Path | None = None
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        parts, rest = left.split(), right.split()
        if len(parts) < 5 or len(rest) < 3:
            continue
        fstype, options = rest[0], set(rest[2].split(","))
        if fstype == "cgroup":
            for c in CONTROLLERS:
                if c in options:
                    v1_mounts.setdefault(c, Path(parts[4]))
        elif fstype == "cgroup2":
            v2_mount = v2_mount or Path(parts[4])
    paths: dict[str, str] = {}
    for line in own.splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path
    if all(c in v1_mounts and c in paths for c in CONTROLLERS):
        return Layout(1, {c: v1_mounts[c] / paths[c].lstrip("/") for c in CONTROLLERS})
    if v2_mount is not None and "" in paths and set(CONTROLLERS) <= set(v2_controllers.split()):
        return Layout(2, {"": v2_mount / paths[""].lstrip("/")})
    return None


def settings(size: Size, version: int) -> list[tuple[str, str, str]]:
    """(controller, file, value) to write, in order, for an instance of `size`. No swap:
    a memory limit that swaps is no limit on a shared host."""
    if version == 1:
        return [("memory", "memory.limit_in_bytes", str(size.memory_bytes)),
                ("memory", "memory.memsw.limit_in_bytes", str(size.memory_bytes)),
                ("pids", "pids.max", str(size.pids)),
                ("cpu", "cpu.shares", str(size.cpu_shares))]
    weight = 1 + (size.cpu_shares - 2) * 9999 // 262142  # systemd's shares -> weight
    return [("", "memory.max", str(size.memory_bytes)), ("", "memory.swap.max", "0"),
            ("", "pids.max", str(size.pids)), ("", "cpu.weight", str(max(1, weight)))]


def oom_kills(text: str) -> int:
    """The `oom_kill N` count of a v1 memory.oom_control or a v2 memory.events."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def r14(size: Size, kills: int) -> str:
    """The log line when the kernel killed some of an instance's processes, not all."""
    return (f"Error R14 (Memory quota exceeded): the kernel killed {kills} process(es) of "
            f"this instance at its {size.memory_mb} MiB limit ({size.name})")


def r15(size: Size) -> str:
    """The reason of an instance's exit when the kernel killed it for its memory."""
    return (f"R15 (Memory quota vastly exceeded): killed at its {size.memory_mb} MiB "
            f"limit ({size.name})")


def root_name(host_id: str, state: Path) -> str:
    """This agent's folder in each hierarchy: stable across its restarts, its own."""
    return f"tally-{host_id}-{hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:8]}"


def entering(dirs: list[Path], then: Callable[[], None] | None) -> Callable[[], None] | None:
    """What a child runs before exec (as root): enter the instance's groups, then `then`
    (become the app's user)."""
    if not dirs:
        return then

    def enter() -> None:
        pid = str(os.getpid()).encode()
        for d in dirs:
            fd = os.open(d / "cgroup.procs", os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        if then is not None:
            then()

    return enter


# --- the shell: folders and files -----------------------------------------------------------


class Unavailable(Exception):
    """This host cannot give instances their own groups; the message says what is missing."""


@dataclass
class Cgroups:
    """The groups of one agent's instances."""

    layout: Layout
    root: str
    seen_kills: dict[str, int] = field(default_factory=dict)
    controllers: tuple[str, ...] = CONTROLLERS
    """What v2 enables for the instances' groups (a test on a host whose memory, pids and
    cpu are v1's runs the v2 path for real with another controller)."""

    @classmethod
    def detect(cls, root: str) -> Cgroups:
        """This process's layout, checked writable by making the root folders; raises
        Unavailable."""
        if os.geteuid() != 0:
            raise Unavailable("the agent is not root: apps run without per-app cgroups")
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
            own = Path("/proc/self/cgroup").read_text()
        except OSError as exc:
            raise Unavailable(f"cannot read the process's cgroups: {exc}") from exc
        layout = parse_layout(mountinfo, own, _v2_controllers())
        if layout is None:
            raise Unavailable("no memory, pids and cpu cgroup controllers (v1 or v2) here")
        groups = cls(layout, root)
        groups.make_roots()
        return groups

    def make_roots(self) -> None:
        """The agent's folders, under which each instance gets its own; raises Unavailable."""
        enable = " ".join(f"+{c}" for c in self.controllers)
        try:
            if self.layout.version == 2:
                self.delegate(enable)
            for d in self.roots():
                d.mkdir(exist_ok=True)
                if self.layout.version == 2:  # let the instances' folders have the controllers
                    (d / "cgroup.subtree_control").write_text(enable)
        except OSError as exc:
            raise Unavailable(f"cannot create cgroups under {', '.join(map(str, self.roots()))}"
                              f": {exc}") from exc

    def delegate(self, enable: str) -> None:
        """cgroup v2 hands a controller to a group's children only if the group holds no
        process itself (the root excepted). If the agent's own group does not hand them on
        yet, the agent moves into a leaf of it (`agent`, as systemd's delegation asks) and
        enables them there; refused, saying why, if they were not delegated to its group
        or other processes share it (raises Unavailable)."""
        own = self.layout.dirs[""]
        wanted = set(self.controllers)
        if wanted <= set((own / "cgroup.subtree_control").read_text().split()):
            return
        missing = wanted - set((own / "cgroup.controllers").read_text().split())
        if missing:
            raise Unavailable(f"cgroup v2: {', '.join(sorted(missing))} not delegated to the "
                              f"agent's group {own} (systemd: Delegate=yes in its unit)")
        if (own / "cgroup.type").exists():  # not the root: it must hold no process
            others = [p for p in (own / "cgroup.procs").read_text().split()
                      if int(p) != os.getpid()]
            if others:
                raise Unavailable(
                    f"cgroup v2: the agent's group {own} holds other processes too "
                    f"({', '.join(others[:5])}); a group that hands controllers to its "
                    "children holds none: run the agent in a group of its own")
            leaf = own / "agent"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
        (own / "cgroup.subtree_control").write_text(enable)

    def roots(self) -> list[Path]:
        return [d / self.root for d in self.layout.dirs.values()]

    def dirs(self, instance_id: str) -> list[Path]:
        return [d / instance_id for d in self.roots()]

    def prepare(self, instance_id: str, size: Size) -> list[Path]:
        """The instance's groups, made if missing, with the limits of its size (a group
        whose size changed gets the new limits: they apply at once)."""
        dirs = {c: d / self.root / instance_id for c, d in self.layout.dirs.items()}
        for d in dirs.values():
            d.mkdir(exist_ok=True)
        for controller, name, value in settings(size, self.layout.version):
            if controller == "" and name.split(".", 1)[0] not in self.controllers:
                continue  # v2: a controller not enabled for the instances has no files
            try:
                (dirs[controller] / name).write_text(value)
            except OSError:
                if (dirs[controller] / name).exists():
                    raise
                continue  # e.g. memsw without swap accounting: nothing to limit there
        self.seen_kills[instance_id] = self.kills(instance_id)
        return list(dirs.values())

    def kills(self, instance_id: str) -> int:
        v1 = self.layout.version == 1
        memory = self.layout.dirs["memory" if v1 else ""] / self.root / instance_id
        try:
            return oom_kills((memory / ("memory.oom_control" if v1 else "memory.events"))
                             .read_text())
        except OSError:
            return 0

    def new_kills(self, instance_id: str) -> int:
        """OOM kills in the instance's group since last asked (or since it was prepared)."""
        now = self.kills(instance_id)
        before = self.seen_kills.get(instance_id, now)
        self.seen_kills[instance_id] = now
        return max(0, now - before)

    def unseen_kills(self, instance_id: str) -> int:
        """OOM kills in the instance's group not taken yet (`seen`)."""
        now = self.kills(instance_id)
        return max(0, now - self.seen_kills.get(instance_id, now))

    def seen(self, instance_id: str, kills: int) -> None:
        """Take `kills` of the instance's `unseen_kills` (not all of them now: another
        may have come since they were counted)."""
        self.seen_kills[instance_id] += kills

    def pids(self, instance_id: str) -> list[int]:
        out: set[int] = set()
        for d in self.dirs(instance_id):
            with contextlib.suppress(OSError):
                out.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return sorted(out)

    def kill_all(self, instance_id: str, patience: float = 2.0) -> None:
        """SIGKILL whatever is left in the instance's groups (a process that left its
        session, a daemon it forked), until they are empty."""
        deadline = time.monotonic() + patience
        while (pids := self.pids(instance_id)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def remove(self, instance_id: str) -> bool:
        """Remove the instance's groups; False while a process is still in one."""
        done = True
        for d in self.dirs(instance_id):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                done = False
        self.seen_kills.pop(instance_id, None)
        return done

    def sweep(self, keep: set[str], min_age: float = 60.0) -> None:
        """Remove the empty groups of instances and runs no longer here (not one made in
        the last `min_age` seconds: a run's, between its preparation and its start)."""
        names: set[str] = set()
        old = time.time() - min_age
        for r in self.roots():
            with contextlib.suppress(OSError):
                names.update(p.name for p in r.iterdir()
                             if p.is_dir() and p.stat().st_mtime < old)
        for name in names - keep:
            self.remove(name)

    def close(self) -> None:
        """Remove the groups, the root folders too (when the agent has stopped its apps:
        what is left in a group is killed first)."""
        for r in self.roots():
            with contextlib.suppress(OSError):
                for d in r.iterdir():
                    if d.is_dir():
                        self.kill_all(d.name)
        self.sweep(set(), min_age=0)
        for r in self.roots():
            with contextlib.suppress(OSError):
                r.rmdir()


def _cgroup2_mounts(mountinfo: str) -> list[Path]:
    out = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"]:
            out.append(Path(left.split()[4]))
    return out


def missing() -> str | None:
    """What this machine lacks for per-app cgroups, or None (nothing is created)."""
    if os.geteuid() != 0:
        return "agents are not root: apps run without per-app cgroups (memory, pids, cpu)"
    try:
        layout = parse_layout(Path("/proc/self/mountinfo").read_text(),
                              Path("/proc/self/cgroup").read_text(), _v2_controllers())
    except OSError as exc:
        return f"cannot read this process's cgroups: {exc}"
    if layout is None:
        return "no memory, pids and cpu cgroup controllers (v1 or v2): apps run unlimited"
    return None


def _v2_controllers() -> str:
    with contextlib.suppress(OSError):
        for mount in _cgroup2_mounts(Path("/proc/self/mountinfo").read_text()):
            return (mount / "cgroup.controllers").read_text()
    return ""


def for_agent(host_id: str, state: Path) -> Cgroups | None:
    """The agent's groups, or None with a warning saying what this host lacks."""
    try:
        groups = Cgroups.detect(root_name(host_id, state))
        log.info("per-app limits: cgroup v%s, under %s", groups.layout.version,
                 ", ".join(map(str, groups.roots())))
        return groups
    except Unavailable as exc:
        log.warning("no per-app limits on this host: %s", exc)
        return None


# --- what the agent calls (each a no-op on a host without cgroups) --------------------------


def confine(groups: Cgroups | None, instance_id: str, size: str,
            then: Callable[[], None] | None) -> Callable[[], None] | None:
    """The child's pre-exec step for an instance or run of `size`: its groups, then `then`."""
    if groups is None:
        return then
    return entering(groups.prepare(instance_id, size_of(size)), then)


def ended(groups: Cgroups | None, instance_id: str, size: str) -> str:
    """After an instance's leader exited: kill what it left in its groups, remove them, and
    say R15 if the kernel killed it for its memory ("" otherwise)."""
    if groups is None:
        return ""
    killed = groups.new_kills(instance_id)
    groups.kill_all(instance_id)
    groups.remove(instance_id)
    return r15(size_of(size)) if killed else ""


def watch(groups: Cgroups | None, instance_id: str, size: str,
          leader_runs: Callable[[], bool]) -> str | None:
    """The R14 line to log if the kernel killed processes of a live instance since last
    asked, else None. The kills are read before `leader_runs` is asked, and taken only if
    it says yes: a kill that took the instance's leader is its exit's R15 (`ended`), not
    an R14 line, even when the stats round comes between the kill and the agent's look
    at the exit (it used to take the kill then, and the exit had no reason)."""
    if groups is None:
        return None
    killed = groups.unseen_kills(instance_id)
    if not killed or not leader_runs():
        return None
    groups.seen(instance_id, killed)
    return r14(size_of(size), killed)
