"""Virtualenvs for releases, keyed by the sha256 of requirements.txt (and the interpreter):
built once, shared by every release (and every agent on the machine) with the same
requirements.

A virtualenv cannot be moved once built (its scripts name their interpreter), so it is
built in place under a file lock and marked complete last; a folder without the mark is a
build that died half-way and is built again.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

COMPLETE = ".tally-complete"


class BuildFailed(Exception):
    """pip could not install the requirements; the message holds its last lines."""


def default_python() -> str:
    """The interpreter apps run on: the system's Python 3, which every app user may
    execute (the platform's own interpreter may live where apps cannot reach)."""
    return "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def requirements_key(release_dir: Path, python: str) -> str:
    req = release_dir / "requirements.txt"
    data = req.read_bytes() if req.exists() else b""
    return hashlib.sha256(python.encode() + b"\0" + data).hexdigest()


def ensure(release_dir: Path, cache: Path, python: str = "", timeout: float = 600.0) -> Path:
    """The virtualenv for the release's requirements on `python`, built if missing."""
    python = python or default_python()
    key = requirements_key(release_dir, python)
    venv = cache / key[:32]
    if (venv / COMPLETE).exists():
        return venv
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{key[:32]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / COMPLETE).exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        _run([python, "-m", "venv", str(venv)], timeout)
        req = release_dir / "requirements.txt"
        if req.exists() and req.read_text().strip():
            _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                  "--disable-pip-version-check", "-r", str(req)], timeout)
        venv.chmod(0o755)
        (venv / COMPLETE).write_text(key)
    return venv


def _run(cmd: list[str], timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BuildFailed(f"{cmd[2]} timed out after {timeout:g}s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise BuildFailed("installing requirements failed: " + " | ".join(tail))
