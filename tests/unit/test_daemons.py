"""`tally up`'s pid records: a pid reused by another process is not ours to stop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

from tally import daemons


def test_a_record_names_its_process_only_while_the_start_time_matches(tmp_path: Path) -> None:
    me, started = os.getpid(), psutil.Process().create_time()
    (tmp_path / "api.pid").write_text(f"{me} {started}")
    assert daemons.pid_of(tmp_path, "api") == me
    (tmp_path / "api.pid").write_text(f"{me} {started - 3600}")  # pid reused since
    assert daemons.pid_of(tmp_path, "api") is None
    (tmp_path / "api.pid").write_text(str(me))  # written by an older tally: pid only
    assert daemons.pid_of(tmp_path, "api") == me
    (tmp_path / "api.pid").write_text("garbage")
    assert daemons.pid_of(tmp_path, "api") is None
    assert daemons.pid_of(tmp_path, "missing") is None


def test_a_dead_daemon_has_no_pid(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    (tmp_path / "relay.pid").write_text(f"{proc.pid} {started}")
    assert daemons.pid_of(tmp_path, "relay") is None
