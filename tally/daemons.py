"""Background daemons for `tally up` on one machine: start once, record pid (and start
time), stop.

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

import psutil

from ledger.cluster import pid_alive


def pid_of(run_dir: Path, name: str) -> int | None:
    """The pid of a live daemon named `name`, or None. The record holds the process's
    start time too: after a crash or a reboot its pid may be another process's now, which
    `tally down` must not kill."""
    try:
        pid, _, started = (run_dir / f"{name}.pid").read_text().strip().partition(" ")
        pid_n, started_at = int(pid), float(started) if started else None
    except (FileNotFoundError, ValueError):
        return None
    if not pid_alive(pid_n):
        return None
    if started_at is not None and abs(_started(pid_n) - started_at) > 0.01:
        return None  # the pid was reused
    return pid_n


def _started(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return -1.0


def start(run_dir: Path, log_dir: Path, name: str, args: list[str],
          env: dict[str, str] | None = None) -> int:
    """Start `tally <args>` (with `env` added to ours) in the background unless already
    running; return its pid."""
    pid = pid_of(run_dir, name)
    if pid:
        return pid
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tally.cli", *args], stdout=log, stderr=log,
            stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **(env or {})},
        )
    (run_dir / f"{name}.pid").write_text(f"{proc.pid} {_started(proc.pid)}")
    return proc.pid


def stop(run_dir: Path, names: list[str], grace: float = 10.0) -> list[str]:
    """SIGTERM every named daemon at once, wait up to `grace` seconds for all of them,
    then SIGKILL the rest. Returns the names that were running."""
    pids = {name: pid for name in names if (pid := pid_of(run_dir, name))}
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = dict(pids)
    while alive and time.monotonic() < deadline:
        alive = {n: p for n, p in alive.items() if pid_alive(p)}
        time.sleep(0.05)
    for pid in alive.values():
        os.kill(pid, signal.SIGKILL)
    for name in pids:
        (run_dir / f"{name}.pid").unlink(missing_ok=True)
    return list(pids)


def names(run_dir: Path) -> list[str]:
    return sorted(p.stem for p in run_dir.glob("*.pid")) if run_dir.exists() else []
