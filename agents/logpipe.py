"""An instance's output reaches its log through a pipe; only the platform writes the file.

The app's stdout and stderr are the write end of a pipe. A small relay process of the
agent's (`python -m agents.logpipe FILE`, root, in a session of its own, outside the app's
cgroups) reads the other end and appends whole lines to the instance's log file, which
the app never holds: it cannot truncate or rewrite its log, nor remove lines the agent
wrote there. The relay is not the agent: it outlives an agent killed -9 (the app keeps
writing, the next agent's shipper keeps reading the file, nothing to adopt), and it exits
when the last process holding the pipe's write end (the app, its children) is gone.

The relay writes at most RATE bytes a second (after a BURST), and never lets the file
pass CAP (the shipper empties it once the collector has it): an app that prints without
end cannot fill its host's disk, nor take its disk time from the others. What it printed
past either is dropped, and the relay says so in the log, as the agent's own line (Heroku's
L10 "output buffer overflow"), once it writes again or after a second of quiet.

The agent's own lines (R14, why it killed an instance) are tagged: they start with MARK,
a byte the relay never lets into an app's line (it replaces it). The collector shows them
as `tally[<instance>]` where an app's lines show `<instance>`, as Heroku's `heroku[web.1]`
beside `app[web.1]`: no app can write a line that looks like the platform's.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MARK = b"\x1e"
"""First byte of a line the agent wrote (ASCII record separator)."""
REPLACEMENT = "\ufffd".encode()
LONGEST = 8192
"""An app's line longer than this is cut into lines of this size (each whole)."""
BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
"""What str.splitlines breaks a line at besides \\n: inside one line, text an app wrote
could otherwise start a line of its own choosing wherever lines are read again."""


@dataclass
class Budget:
    """What of an app's output the relay may write now (pure: the clock and the file's
    size are given). Bytes a second, a burst, and the most the file may hold."""

    rate: int = 1 << 20
    burst: int = 8 << 20
    cap: int = 64 << 20
    tokens: float = -1.0
    at: float = 0.0
    dropped_lines: int = 0
    dropped_bytes: int = 0
    why: str = ""

    def admit(self, data: bytes, size: int, now: float) -> bool:
        """Whether `data` (whole lines) may be appended to a file of `size` bytes now;
        if not, it is counted as dropped."""
        if self.tokens < 0:
            self.tokens, self.at = float(self.burst), now
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if size + len(data) > self.cap:
            self.why = (f"its log on this host holds {self.cap >> 20} MiB not yet collected")
        elif len(data) > self.tokens:
            self.why = f"it printed faster than {self.rate / 2**20:g} MiB/s"
        else:
            self.tokens -= len(data)
            return True
        self.dropped_lines += data.count(b"\n")
        self.dropped_bytes += len(data)
        return False

    def overflow(self) -> bytes:
        """The agent's line saying what was dropped since the last one (b"" if nothing),
        and a new count."""
        if not self.dropped_lines:
            return b""
        line = MARK + (f"Error L10 (output buffer overflow): {self.dropped_lines} line(s) "
                       f"({self.dropped_bytes / 2**20:.1f} MiB) of this instance's output "
                       f"dropped: {self.why}").encode() + b"\n"
        self.dropped_lines = self.dropped_bytes = 0
        return line

    def argv(self) -> list[str]:
        return [str(self.rate), str(self.burst), str(self.cap)]


def say(path: Path, text: str) -> None:
    """Append one line of the agent's own to the instance's log."""
    line = MARK + clean(text).encode() + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def clean(text: str) -> str:
    """One line's text, with nothing in it that would break it into more."""
    return BREAKS.sub("\ufffd", text.replace("\n", "\ufffd"))


def app_lines(data: bytes) -> list[bytes]:
    """Whole lines of an app's output (each ending with \\n) as the relay writes them:
    none holds MARK (anywhere: a reader may start mid-line, as a tail's window or a
    shipper's read does), none is longer than LONGEST."""
    out = []
    for line in data.replace(MARK, REPLACEMENT).split(b"\n"):
        for start in range(0, max(len(line), 1), LONGEST):
            out.append(line[start:start + LONGEST] + b"\n")
    return out


def lines(data: bytes) -> list[tuple[bool, str]]:
    """(the agent's?, text) of each line of an instance log's bytes."""
    out = []
    for raw in data.split(b"\n"):
        ours = raw.startswith(MARK)
        out.append((ours, clean((raw[1:] if ours else raw).decode("utf-8", "replace"))))
    if not data or data.endswith(b"\n"):
        out.pop()
    return out


def relay(source: int, path: Path, budget: Budget | None = None) -> None:
    """Copy the app's output from `source` to `path`, whole lines at a time, within the
    budget, until every writer closed the pipe."""
    budget = budget or Budget()
    target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(data: bytes) -> None:
        if budget.admit(data, os.fstat(target).st_size, time.monotonic()):
            os.write(target, budget.overflow() + data)
    pending = b""
    while True:
        try:
            if budget.dropped_lines and not select.select([source], [], [], 1.0)[0]:
                os.write(target, budget.overflow())  # a second of quiet after a drop: say so
                continue
            chunk = os.read(source, 65536)
        except InterruptedError:
            continue
        if not chunk:
            break
        pending += chunk
        end = pending.rfind(b"\n")
        if end < 0 and len(pending) < LONGEST:
            continue
        whole, pending = (pending[:end], pending[end + 1:]) if end >= 0 else (pending, b"")
        write(b"".join(app_lines(whole)))
    if pending:
        write(b"".join(app_lines(pending)))
    os.write(target, budget.overflow())
    os.close(target)


def start(path: Path, budget: Budget | None = None) -> tuple[int, subprocess.Popen]:
    """A pipe whose reader is a new relay writing `path`: (write end for the app, relay).
    The caller closes the write end once the app has it."""
    read, write = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-S", "-m", "agents.logpipe", str(path),
                                 *(budget or Budget()).argv()],
                                stdin=read, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                cwd="/", env={"PYTHONPATH": _package_root()})
    except OSError:
        os.close(write)
        raise
    finally:
        os.close(read)
    return write, proc


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def wait_gone(pid: int, proc: subprocess.Popen | None, patience: float = 3.0) -> None:
    """Until the relay wrote everything and exited (its app's processes are all gone), at
    most `patience` seconds: an exited instance's last lines are in its log before the
    agent reads them."""
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(patience)
        return
    from ledger.cluster import pid_alive  # not at the top: the relay imports this module

    deadline = time.monotonic() + patience
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


if __name__ == "__main__":
    rate, burst, cap = (int(a) for a in sys.argv[2:5])
    relay(0, Path(sys.argv[1]), Budget(rate, burst, cap))
