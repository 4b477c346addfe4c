"""Background daemons for `tally up` on one machine: start once, record pid, stop.

A real fleet runs these under systemd or a supervisor of the operator's choice; this is the
small stand-in that makes `make up` bring the whole platform up on a laptop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def pid_of(run_dir: Path, name: str) -> int | None:
    """The pid of a live daemon named `name`, or None."""
    try:
        pid = int((run_dir / f"{name}.pid").read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


def start(run_dir: Path, log_dir: Path, name: str, args: list[str]) -> int:
    """Start `tally <args>` in the background unless already running; return its pid."""
    pid = pid_of(run_dir, name)
    if pid:
        return pid
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tally.cli", *args], stdout=log, stderr=log,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    (run_dir / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def stop(run_dir: Path, name: str, grace: float = 10.0) -> bool:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL. True if it was running."""
    pid = pid_of(run_dir, name)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
    (run_dir / f"{name}.pid").unlink(missing_ok=True)
    return True


def names(run_dir: Path) -> list[str]:
    return sorted(p.stem for p in run_dir.glob("*.pid")) if run_dir.exists() else []
