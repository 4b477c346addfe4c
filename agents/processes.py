"""App processes on one host: start, watch, stop, and the pid records that let a restarted
agent adopt what it started before (never orphan, never start twice). Their output goes
through a pipe to a relay that writes the instance's log (agents/logpipe.py).

Each process leads its own session (its pid is its process group), so a stop reaches
gunicorn's workers too. A pid record holds the pid *and* its start time: a recycled pid is
not mistaken for our process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from agents import logpipe

CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
"""What a terminal acts on rather than shows (ESC sequences that move the cursor back over
`app: `, backspaces): none reaches `tally ps` or `tally why` from a tail."""


@dataclass(frozen=True)
class Record:
    instance_id: str
    pid: int
    create_time: float
    port: int
    relay: int = 0
    """The pid of the process writing its log (agents/logpipe.py)."""


@dataclass(frozen=True)
class Limits:
    open_files: int = 4096
    memory_mb: int = 1024


class Processes:
    """The processes of one agent, under `state_dir` (pid records, instance logs)."""

    def __init__(self, state_dir: Path) -> None:
        self.pids = state_dir / "pids"
        self.logs = state_dir / "logs"
        for private in (self.pids, self.logs):
            private.mkdir(parents=True, exist_ok=True)
            private.chmod(0o700)
        self.children: dict[int, subprocess.Popen] = {}
        self.relays: dict[str, tuple[int, subprocess.Popen | None]] = {}
        """Instance -> its log relay's pid (and process, if this agent started it)."""

    def start(self, instance_id: str, port: int, argv: list[str], cwd: Path,
              env: dict[str, str], limits: Limits,
              demote: Callable[[], None] | None = None, pass_fds: tuple[int, ...] = ()) -> int:
        """Launch the process, its output piped to a relay appending it to the instance's
        log; record its pid. `pass_fds`: descriptors it inherits (its listening socket,
        agents/ports.py)."""
        write, relay = logpipe.start(self.log_path(instance_id))
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=write, stderr=write,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    pass_fds=pass_fds, preexec_fn=child_setup(limits, demote))
        finally:
            os.close(write)  # the relay's end of file: when the app's processes are gone
        self.children[proc.pid] = proc
        self.relays[instance_id] = (relay.pid, relay)
        record = Record(instance_id, proc.pid, psutil.Process(proc.pid).create_time(), port,
                        relay.pid)
        tmp = self.pids / f".{instance_id}.json"
        tmp.write_text(json.dumps(asdict(record)))
        tmp.replace(self.pids / f"{instance_id}.json")
        return proc.pid

    def say(self, instance_id: str, text: str) -> None:
        """A line of the agent's own in the instance's log (tagged: no app can forge it)."""
        logpipe.say(self.log_path(instance_id), text)

    def drained(self, instance_id: str) -> None:
        """After the instance's processes are gone: until its relay wrote their last lines
        (a few seconds at most)."""
        pid, proc = self.relays.pop(instance_id, (0, None))
        if pid:
            logpipe.wait_gone(pid, proc)

    def log_path(self, instance_id: str) -> Path:
        return self.logs / f"{instance_id}.log"

    def records(self) -> list[Record]:
        out = []
        for p in sorted(self.pids.glob("[!.]*.json")):  # not a half-written .x.json
            try:
                out.append(Record(**json.loads(p.read_text())))
            except (ValueError, TypeError, OSError):
                p.unlink(missing_ok=True)
                continue
            if out[-1].relay and out[-1].instance_id not in self.relays:  # adopted
                self.relays[out[-1].instance_id] = (out[-1].relay, None)
        return out

    def forget(self, instance_id: str) -> None:
        (self.pids / f"{instance_id}.json").unlink(missing_ok=True)

    def alive(self, record: Record) -> bool:
        """Is the recorded process still ours and running (a zombie counts as exited)?"""
        try:
            p = psutil.Process(record.pid)
            return (abs(p.create_time() - record.create_time) < 0.01
                    and p.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def runs(self, pid: int) -> bool:
        """Whether the process runs (one exited but not waited for yet does not); unlike
        `exit_status` it never waits for our child, whose exit status stays to be read."""
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def exit_status(self, pid: int) -> tuple[bool, int | None, int | None]:
        """(exited, exit code, signal) of a process; codes are known for our own children."""
        child = self.children.get(pid)
        if child is not None:
            code = child.poll()
            if code is None:
                return False, None, None
            del self.children[pid]
            return True, (code if code >= 0 else None), (-code if code < 0 else None)
        try:
            p = psutil.Process(pid)
            return p.status() == psutil.STATUS_ZOMBIE, None, None
        except psutil.Error:
            return True, None, None

    def signal_group(self, pid: int, sig: int) -> None:
        """Signal the process's whole group (gunicorn's workers with their master)."""
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def tail(self, instance_id: str, lines: int = 20) -> list[str]:
        """The last lines of the instance's log, each saying whose: the agent's start with
        `tally: `, the app's with `app: ` (as Heroku's `heroku[web.1]` and `app[web.1]`),
        so an app's line `tally: Error R14 ...` reads `app: tally: Error R14 ...` in `tally
        ps` and `tally why` (the tag is the relay's, agents/logpipe.py: no app sets it)."""
        try:
            with open(self.log_path(instance_id), "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 410 * lines))
                data = f.read()
        except OSError:
            return []
        return [f"{'tally' if ours else 'app'}: {CONTROLS.sub(chr(0xFFFD), text)}"[:500]
                for ours, text in logpipe.lines(data)[-lines:]]


def child_setup(limits: Limits, demote: Callable[[], None] | None) -> Callable[[], None]:
    """What a child does before exec: its limits (set as root, so the app cannot raise
    them), then become the app's user. No core dumps: where the host pipes them to a
    collector (systemd-coredump, apport), they would land on the host's disk."""
    def setup() -> None:
        _limit(resource.RLIMIT_NOFILE, limits.open_files)
        _limit(resource.RLIMIT_AS, limits.memory_mb * 1024 * 1024)
        _limit(resource.RLIMIT_CORE, 0)
        if demote is not None:
            demote()

    return setup


def _limit(which: int, value: int) -> None:
    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))  # hard too: the app cannot raise it again
