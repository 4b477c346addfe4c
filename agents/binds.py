"""Who may bind a port of the agent's range: the kernel decides, at bind(), by uid.

A web command that is not gunicorn (`web: python app.py`, reading $PORT) binds its port
itself, so the agent must let the port go before the app starts. Without a rule, any other
process of the machine could take it in that moment, and the victim's first start would
fail with `Address already in use`. So the agent attaches to the cgroup v2 root a small
eBPF program of type `cgroup/bind4` and `cgroup/bind6` (the kernel runs it at every bind()
of every socket on the machine, whatever its address): a bind to a port of the agent's
range that the agent holds or placed, by a process that is not root and not the user of
the app placed on that port, gets EPERM. The ports are an eBPF hash map (port -> uid) the
agent keeps equal to its placements (the same owners the network rules use,
agents/netrules.py) and the ports it holds (uid 0: root only). A port in neither is bound
by someone else and left alone (ranges of agents on one machine may overlap in tests).
Heroku-style apps keep working unchanged: the app binds `0.0.0.0:$PORT` as it always did,
and only it can.

The program outlives the agent (attached to a cgroup, it stays until detached): after a
kill -9, the apps' ports stay reserved for their apps, and the next agent attaches its own
program, then detaches its predecessors' and those of any dead agent (each program's name
holds its agent's pid, `stale`). The kernel admits 64 programs per hook on a cgroup; past
that, or without eBPF (not root, an old kernel, no cgroup v2 mount), the agent says so and
falls back on taking a squatted port back (agents/ports.py `evict`).

The program is assembled here (twenty instructions; no compiler or libbpf at run time)
and loaded through the bpf(2) system call with ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from ledger.cluster import pid_alive

log = logging.getLogger("tally.agent")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
SYS_BPF = 321  # x86_64
MAP_CREATE, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 2, 3, 4
PROG_LOAD, PROG_ATTACH, PROG_DETACH = 5, 8, 9
PROG_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, PROG_QUERY = 13, 15, 16
MAP_TYPE_HASH = 1
PROG_TYPE_CGROUP_SOCK_ADDR = 18
INET4_BIND, INET6_BIND = 8, 9
F_ALLOW_MULTI = 2
NAME = re.compile(r"^tly([0-9a-f]{5})(\d+)$")
"""A program's name: `tly`, five hex digits naming the agent (`tag`), its pid."""


class Unavailable(Exception):
    """The bind rule cannot be used here; the message says what is missing."""


def tag(root: str) -> str:
    """Five hex digits naming an agent (root: cgroups.root_name) across its restarts."""
    return hashlib.sha256(root.encode()).hexdigest()[:5]


def program_name(root: str, pid: int) -> str:
    return f"tly{tag(root)}{pid}"


def stale(names: Iterable[str], mine: str, alive: Callable[[int], bool]) -> list[str]:
    """The programs to detach: earlier ones of this agent, and those of dead agents."""
    own = NAME.match(mine)
    out = []
    for name in names:
        match = NAME.match(name)
        if match and name != mine and ((own and match[1] == own[1]) or not alive(int(match[2]))):
            out.append(name)
    return out


# --- the program --------------------------------------------------------------------------


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def program(map_fd: int, low: int, high: int) -> bytes:
    """bind4/bind6: allow (1) a port outside [low, high] or not in the map, root, or the
    port's owner in the map; else deny (0: the bind gets EPERM)."""
    user_port = 24  # struct bpf_sock_addr: network byte order, 4-byte reads allowed
    allow = 19  # deny is 17
    code = [
        _insn(0xBF, 6, 1),                        # 0  r6 = ctx
        _insn(0x61, 7, 6, user_port),             # 1  r7 = ctx->user_port
        _insn(0xDC, 7, imm=16),                   # 2  r7 = be16(r7): host order
        _insn(0xA5, 7, off=allow - 4, imm=low),   # 3  if r7 < low goto allow
        _insn(0x25, 7, off=allow - 5, imm=high),  # 4  if r7 > high goto allow
        _insn(0x85, imm=15),                      # 5  call get_current_uid_gid
        _insn(0xBC, 8, 0),                        # 6  w8 = (u32) r0: the uid
        _insn(0x15, 8, off=allow - 8, imm=0),     # 7  if uid == 0 goto allow
        _insn(0x63, 10, 7, -4),                   # 8  *(u32 *)(fp - 4) = port
        _insn(0x18, 1, 1, imm=map_fd),            # 9  r1 = the owners map
        _insn(0),                                 # 10 (second half of the 64-bit load)
        _insn(0xBF, 2, 10),                       # 11 r2 = fp
        _insn(0x07, 2, imm=-4),                   # 12 r2 += -4: the key
        _insn(0x85, imm=1),                       # 13 call map_lookup_elem
        _insn(0x15, 0, off=allow - 15, imm=0),    # 14 if not ours goto allow
        _insn(0x61, 1, 0, 0),                     # 15 r1 = owner
        _insn(0x1D, 1, 8, off=allow - 17),        # 16 if owner == uid goto allow
        _insn(0xB7, 0, imm=0),                    # 17 deny: r0 = 0
        _insn(0x95),                              # 18 exit
        _insn(0xB7, 0, imm=1),                    # 19 allow: r0 = 1
        _insn(0x95),                              # 20 exit
    ]
    return b"".join(code)


# --- bpf(2) -------------------------------------------------------------------------------


def _bpf(cmd: int, attr: bytes | ctypes.Array) -> int:
    buf = attr if isinstance(attr, ctypes.Array) else ctypes.create_string_buffer(attr, 128)
    result = _libc.syscall(SYS_BPF, cmd, buf, len(buf))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return int(result)


def _name(text: str) -> bytes:
    return text.encode()[:15].ljust(16, b"\0")


def create_map(name: str, entries: int) -> int:
    return _bpf(MAP_CREATE, struct.pack("<IIIIIII16s", MAP_TYPE_HASH, 4, 4, entries,
                                        0, 0, 0, _name(name)))


def load(insns: bytes, name: str, attach_type: int) -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    licence = ctypes.create_string_buffer(b"GPL")
    log_buf = ctypes.create_string_buffer(4096)
    attr = struct.pack("<IIQQIIQII16sII", PROG_TYPE_CGROUP_SOCK_ADDR, len(insns) // 8,
                       ctypes.addressof(code), ctypes.addressof(licence), 1, len(log_buf),
                       ctypes.addressof(log_buf), 0, 0, _name(name), 0, attach_type)
    try:
        return _bpf(PROG_LOAD, attr)
    except OSError as exc:
        text = log_buf.value.decode(errors="replace").strip()
        raise OSError(exc.errno, f"{exc.strerror}: {text[-300:]}") from exc


def set_owner(map_fd: int, port: int, uid: int) -> None:
    key, value = ctypes.c_uint32(port), ctypes.c_uint32(uid)
    _bpf(MAP_UPDATE_ELEM, struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(key),
                                      ctypes.addressof(value), 0))


def drop_owner(map_fd: int, port: int) -> None:
    key = ctypes.c_uint32(port)
    with contextlib.suppress(FileNotFoundError):
        _bpf(MAP_DELETE_ELEM, struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(key), 0, 0))


def attach(cgroup_fd: int, prog_fd: int, attach_type: int) -> None:
    _bpf(PROG_ATTACH, struct.pack("<IIIII", cgroup_fd, prog_fd, attach_type, F_ALLOW_MULTI, 0))


def detach(cgroup_fd: int, prog_fd: int, attach_type: int) -> None:
    _bpf(PROG_DETACH, struct.pack("<IIIII", cgroup_fd, prog_fd, attach_type, 0, 0))


def attached(cgroup_fd: int, attach_type: int) -> list[int]:
    """The ids of the programs attached to the cgroup for that hook."""
    ids = (ctypes.c_uint32 * 64)()
    attr = ctypes.create_string_buffer(struct.pack("<IIIIQI", cgroup_fd, attach_type, 0, 0,
                                                   ctypes.addressof(ids), 64), 128)
    _bpf(PROG_QUERY, attr)
    count = struct.unpack_from("<I", attr, 24)[0]
    return list(ids[:count])


def program_by_id(prog_id: int) -> tuple[int, str]:
    """An fd of the program and its name."""
    fd = _bpf(PROG_GET_FD_BY_ID, struct.pack("<III", prog_id, 0, 0))
    info = ctypes.create_string_buffer(256)
    _bpf(OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, len(info), ctypes.addressof(info)))
    return fd, info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")


# --- the agent's rule ---------------------------------------------------------------------


def cgroup2_root(mountinfo: str) -> Path | None:
    """The cgroup v2 mount (unified hierarchy, hybrid or not)."""
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"]:
            return Path(left.split()[4])
    return None


class BindRule:
    """The agent's two programs (bind4, bind6) and their owners map."""

    def __init__(self, root: str, low: int, high: int, cgroup: Path,
                 pid: int | None = None) -> None:
        """`pid`: the agent's, in the programs' name (this process's unless said)."""
        self.name = program_name(root, pid or os.getpid())
        self.low, self.high = low, high
        self.owners: dict[int, int] = {}
        self.cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        self.map_fd = -1
        self.progs: dict[int, int] = {}
        try:
            self.map_fd = create_map(self.name, max(1, high - low + 1))
            for hook in (INET4_BIND, INET6_BIND):
                self.progs[hook] = load(program(self.map_fd, low, high), self.name, hook)
        except OSError:
            self.close()
            raise

    def apply(self, owners: Mapping[int, int], held: Iterable[int] = ()) -> None:
        """Make the map say `owners` (port -> uid of the app placed there) and `held` (ports
        the agent holds: root's only); ports outside the range are ignored. Then attach the
        programs (at the first call) and detach stale ones. A port of the range in neither
        is left to the kernel's usual rules: it is bound by someone else (an instance of a
        previous agent, or of another agent whose range overlaps ours), not ours to guard."""
        want = {p: 0 for p in held if self.low <= p <= self.high}
        want.update({p: u for p, u in owners.items() if self.low <= p <= self.high})
        for port in set(self.owners) - set(want):
            drop_owner(self.map_fd, port)
        for port, uid in want.items():
            if self.owners.get(port) != uid:
                set_owner(self.map_fd, port, uid)
        self.owners = want
        if not self.attached:
            for hook, fd in self.progs.items():
                attach(self.cgroup_fd, fd, hook)
            self.attached = True
            self.sweep()

    attached = False

    def sweep(self) -> None:
        """Detach the programs of this agent's predecessors and of dead agents."""
        detach_named(self.cgroup_fd, lambda name: bool(stale([name], self.name, pid_alive)))

    def remove(self) -> None:
        """Detach (the agent stops): its adopted apps' ports are guarded again by the next
        agent's rule."""
        for hook, fd in self.progs.items():
            if self.attached:
                with contextlib.suppress(OSError):
                    detach(self.cgroup_fd, fd, hook)
        self.attached = False

    def close(self) -> None:
        self.remove()
        for fd in [*self.progs.values(), self.map_fd, self.cgroup_fd]:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.progs, self.map_fd, self.cgroup_fd = {}, -1, -1


def detach_named(cgroup_fd: int, doomed: Callable[[str], bool]) -> None:
    """Detach from the cgroup the bind programs whose names `doomed` says."""
    for hook in (INET4_BIND, INET6_BIND):
        for prog_id in attached(cgroup_fd, hook):
            try:
                fd, name = program_by_id(prog_id)
            except OSError:
                continue  # detached meanwhile
            try:
                if NAME.match(name) and doomed(name):
                    detach(cgroup_fd, fd, hook)
                    log.info("detached the bind rule %s (its agent is gone)", name)
            except OSError:
                pass
            finally:
                os.close(fd)


def remove_program(root: str, pid: int) -> None:
    """Detach the bind rule of the agent `root` that ran as `pid` (killed -9: tests)."""
    if missing() is not None:
        return
    cgroup = cgroup2_root(Path("/proc/self/mountinfo").read_text())
    assert cgroup is not None
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        detach_named(fd, lambda name: name == program_name(root, pid))
    finally:
        os.close(fd)


def missing() -> str | None:
    """What this host lacks to reserve ports by uid, or None."""
    if os.geteuid() != 0:
        return "agents are not root: a port let go for an app can be taken by another"
    try:
        root = cgroup2_root(Path("/proc/self/mountinfo").read_text())
    except OSError as exc:
        return f"cannot read the mounts: {exc}"
    if root is None:
        return "no cgroup v2 mount: a port let go for an app can be taken by another"
    return None


def for_agent(root: str, low: int, high: int) -> BindRule | None:
    """The agent's bind rule (not attached yet: `apply` does), or None with a warning."""
    if (reason := missing()) is not None:
        log.warning("ports are not reserved by uid on this host: %s", reason)
        return None
    cgroup = cgroup2_root(Path("/proc/self/mountinfo").read_text())
    assert cgroup is not None
    try:
        return BindRule(root, low, high, cgroup)
    except OSError as exc:
        reason = ("too many programs on the cgroup" if exc.errno == errno.E2BIG else str(exc))
        log.warning("ports are not reserved by uid on this host: %s", reason)
        return None
