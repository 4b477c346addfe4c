"""The build sandbox: tenant build code (pip, setup.py, build backends, bin/*_compile) runs
here, never on the platform's side of any boundary.

- as the app's own build uid (ledger/uids.py: build_uid), never root, never an app's uid,
  never another app's build's: one app's build cannot touch another's cache or folders
  even if it escaped its mount namespace;
- inside bubblewrap: new user, pid, ipc, uts and cgroup namespaces; the system's /usr and a
  few files of /etc read-only; a fresh /proc and /dev; the build folder at /app, a scratch
  /tmp and the app's own build cache at /cache read-write; nothing else of the host (no
  TALLY_HOME, no /root, no /home, no agent state, no other app's files or cache);
- with an environment made from nothing: no token, no ledger DSN, no TALLY_* variable;
- in cgroup v1 groups (memory, pids, cpu) when those are writable, plus rlimits (file size,
  processes, core dumps), a wall-clock timeout and a disk quota checked every second;
- with the network of the host (so the package index answers), unless `network="none"`.

`run` is the one shell: it returns the exit status and why it was stopped, and passes every
output line to a callback as it comes.
"""

from __future__ import annotations

import configparser
import contextlib
import grp
import os
import pwd
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

BWRAP = "/usr/bin/bwrap"
CGROUP_ROOT = Path("/sys/fs/cgroup")
ETC_FILES = ("passwd", "group", "nsswitch.conf", "hosts", "resolv.conf", "host.conf",
             "gai.conf", "ssl", "ca-certificates", "ca-certificates.conf", "pip.conf",
             "xdg/pip", "python3", "python3.11", "python3.12", "alternatives", "localtime",
             "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "mime.types", "protocols",
             "services", "gitconfig")
"""What of /etc a build sees: name lookup, certificates, pip's configuration, the linker's
cache. Not shadow, ssh keys, cron, or anything an operator keeps there."""
PIP_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_TRUSTED_HOST",
           "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_DISABLE_PIP_VERSION_CHECK",
           "PIP_CONSTRAINT", "PIP_RETRIES", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
           "http_proxy", "https_proxy", "no_proxy")
"""Variables of the builder's own environment a build inherits: how to reach the index."""
LOADER_VARS = frozenset({
    "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH",
    "MALLOC_TRACE", "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TZDIR"})
"""With every LD_* name, what glibc's loader and libc read before a program's first line
(the names it drops for setuid programs): bwrap is not setuid here, so these must never
reach its own environment from an app's config, or code would run before the sandbox."""
PIP_CONFIGS = (Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf"))


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 900.0
    memory_mb: int = 2048
    processes: int = 256
    disk_mb: int = 2048
    """The build folder, /tmp and the cache together."""
    cpu_shares: int = 512
    """Half a default share: builds yield to running apps when the host is busy."""


@dataclass(frozen=True)
class Spec:
    """One sandboxed command: its argv inside, the host folders it gets, its environment."""

    argv: list[str]
    app_dir: Path
    tmp_dir: Path
    cache_dir: Path
    env: dict[str, str]
    ro_binds: tuple[tuple[Path, str], ...] = ()
    network: str = "host"
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Outcome:
    code: int | None
    stopped: str = ""
    """Empty when the command ended by itself; else which limit stopped it."""


class SandboxUnavailable(Exception):
    """This host cannot run builds (no bubblewrap, not root): the message says what."""


@dataclass(frozen=True)
class BuildUser:
    uid: int
    gid: int


def preflight() -> None:
    """Can this machine run builds at all? SandboxUnavailable says why not."""
    if os.geteuid() != 0:
        raise SandboxUnavailable("the builder must start as root to switch to a build's uid")
    if not Path(BWRAP).exists():
        raise SandboxUnavailable(f"{BWRAP} is missing: install Debian's bubblewrap")


def build_user(uid: int) -> BuildUser:
    """The user an app's builds run as: `uid` (ledger/uids.py: build_uid, the app's own
    uid moved above the apps' range), with a group of the same number. No passwd entry is
    needed or made; a uid this machine gives someone else is refused."""
    preflight()
    if uid < 1000:
        raise SandboxUnavailable(f"build uid {uid} is a system uid")
    for lookup in (pwd.getpwuid, grp.getgrgid):
        with contextlib.suppress(KeyError):
            raise SandboxUnavailable(f"build uid {uid} belongs to {lookup(uid)[0]} on this "
                                     "machine (keep TALLY_APP_UIDS and the range above it "
                                     "clear of other users)")
    return BuildUser(uid, uid)


def index_paths(env: dict[str, str], configs: Iterable[Path] = PIP_CONFIGS) -> list[Path]:
    """Local folders pip's configuration names (file:// indexes, find-links, constraints,
    certificates): a build must see them read-only to reach the same index."""
    values = [v for k, v in env.items() if k in PIP_ENV]
    for conf in configs:
        parser = configparser.ConfigParser(interpolation=None)
        with contextlib.suppress(OSError, configparser.Error):
            parser.read(conf)
            values += [v for s in parser.sections() for v in parser[s].values()]
    out: list[Path] = []
    for value in values:
        for word in value.split():
            path = word.removeprefix("file://")
            if path.startswith("/") and Path(path).exists() and not path.startswith("/etc/"):
                out.append(Path(path))
    return sorted(set(out))


def bwrap_argv(spec: Spec) -> list[str]:
    """The bubblewrap command line for `spec` (pure: unit-tested)."""
    argv = [BWRAP, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--hostname", "build"]
    argv += ["--unshare-net"] if spec.network == "none" else ["--share-net"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for link in ("bin", "sbin", "lib", "lib64"):
        target = os.readlink(f"/{link}") if os.path.islink(f"/{link}") else None
        if target:
            argv += ["--symlink", target, f"/{link}"]
        elif os.path.isdir(f"/{link}"):
            argv += ["--ro-bind", f"/{link}", f"/{link}"]
    for name in ETC_FILES:
        if os.path.exists(f"/etc/{name}"):
            argv += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--bind", str(spec.app_dir), "/app", "--bind", str(spec.tmp_dir), "/tmp",
             "--bind", str(spec.cache_dir), "/cache"]
    for host, inside in spec.ro_binds:
        argv += ["--ro-bind", str(host), inside]
    return [*argv, "--chdir", "/app", "--", *spec.argv]


def loader_safe(env: dict[str, str]) -> dict[str, str]:
    """`env` without the variables that steer the dynamic loader or libc (LOADER_VARS)."""
    return {k: v for k, v in env.items() if not k.startswith("LD_") and k not in LOADER_VARS}


# --- the shell -----------------------------------------------------------------------------


class _Cgroups:
    """The build's cgroup v1 groups; none when the hierarchy is not writable here."""

    def __init__(self, name: str, limits: Limits) -> None:
        self.dirs: list[Path] = []
        wanted = {"memory": {"memory.limit_in_bytes": limits.memory_mb * 2**20},
                  "pids": {"pids.max": limits.processes},
                  "cpu": {"cpu.shares": limits.cpu_shares}}
        for controller, values in wanted.items():
            d = CGROUP_ROOT / controller / "tally-builds" / name
            try:
                d.mkdir(parents=True, exist_ok=True)
                for key, value in values.items():
                    (d / key).write_text(str(value))
            except OSError:
                continue
            self.dirs.append(d)

    def join(self) -> None:
        """In the child, before exec (still root)."""
        for d in self.dirs:
            with contextlib.suppress(OSError):
                (d / "cgroup.procs").write_text(str(os.getpid()))

    def oom_killed(self) -> bool:
        """Did the kernel kill a process of the build for memory (cgroup v1 `oom_kill N`)?"""
        for d in self.dirs:
            with contextlib.suppress(OSError, ValueError):
                for line in (d / "memory.oom_control").read_text().splitlines():
                    if line.startswith("oom_kill ") and int(line.split()[1]) > 0:
                        return True
        return False

    def kill_all(self) -> None:
        """SIGKILL whatever is left in the groups (what a build forked and left behind)."""
        for _ in range(50):
            pids = set()
            for d in self.dirs:
                with contextlib.suppress(OSError, ValueError):
                    pids |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def remove(self) -> None:
        for d in self.dirs:
            with contextlib.suppress(OSError):
                d.rmdir()


def disk_used(*roots: Path, cap: int = 200_000) -> int:
    """Bytes under `roots` (lstat, links not followed); stops counting after `cap` entries,
    which then count as over any quota (a million empty files is an attack too)."""
    total, seen = 0, 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in filenames + dirnames:
                seen += 1
                if seen > cap:
                    return 1 << 62
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def run(spec: Spec, user: BuildUser, name: str, on_line: Callable[[str], None],
        tick: Callable[[], None] = lambda: None) -> Outcome:
    """Run `spec` in the sandbox as the build user; every output line goes to `on_line`,
    `tick` is called every second (an exception from it stops the build and propagates)."""
    for d in (spec.app_dir, spec.tmp_dir, spec.cache_dir):
        os.chown(d, user.uid, user.gid)
    limits = spec.limits
    groups = _Cgroups(name, limits)

    def child() -> None:
        groups.join()
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        fsize = limits.disk_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        nproc = max(limits.processes * 4, 1024)  # per uid: the app's builds on this machine
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        os.setgroups([])
        os.setgid(user.gid)
        os.setuid(user.uid)

    stopped = ""
    proc = subprocess.Popen(bwrap_argv(spec), env=loader_safe(spec.env), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=child, cwd="/")
    reader = threading.Thread(target=_pump, args=(proc, on_line), daemon=True)
    reader.start()
    deadline = time.monotonic() + limits.timeout_s
    try:
        while proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1.0)
            if proc.poll() is not None:
                break
            tick()
            if time.monotonic() > deadline:
                stopped = f"the build took longer than {limits.timeout_s:g} s"
            elif disk_used(spec.app_dir, spec.tmp_dir, spec.cache_dir) > limits.disk_mb * 2**20:
                stopped = f"the build wrote more than {limits.disk_mb} MB"
            if stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        groups.kill_all()
        proc.wait()
        reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()
        if not stopped and groups.oom_killed():
            stopped = f"the build used more than {limits.memory_mb} MB of memory"
        groups.remove()
    code = proc.returncode
    return Outcome(code if code is not None and code >= 0 else None, stopped)


LINE_CHARS = 2000
"""A build output line is cut here; the rest of a longer one is read and dropped."""


def _pump(proc: subprocess.Popen, on_line: Callable[[str], None]) -> None:
    """Each line of the build's output, cut at LINE_CHARS. Read in bounded pieces: a line
    without end (a tenant's build printing no newline) must not grow root's builder."""
    assert proc.stdout is not None
    rest_of_long_line = False
    while raw := proc.stdout.readline(4 * LINE_CHARS):
        if not rest_of_long_line:
            on_line(raw.decode("utf-8", "replace").rstrip("\n")[:LINE_CHARS])
        rest_of_long_line = not raw.endswith(b"\n")
