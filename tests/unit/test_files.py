"""Root writing into a server user's folder is not led elsewhere by a planted link."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from ledger.files import write_for


def test_a_link_planted_at_the_name_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "roots-file"
    target.write_text("root's\n")
    target.chmod(0o600)
    planted = tmp_path / "patroni-a.yml"
    planted.symlink_to(target)
    with pytest.raises(OSError):
        write_for(planted, "config", "nobody")
    assert target.read_text() == "root's\n" and target.stat().st_uid == os.geteuid()


def test_a_fifo_at_the_name_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "pid"
    os.mkfifo(fifo)
    with pytest.raises(OSError):
        write_for(fifo, "123")


def test_a_file_is_rewritten_whole_with_its_mode_and_owner(tmp_path: Path) -> None:
    path = tmp_path / "postgresql.conf"
    path.write_text("a much longer earlier text\n")
    path.chmod(0o666)
    write_for(path, "port = 5\n", "nobody" if os.geteuid() == 0 else None)
    assert path.read_text() == "port = 5\n" and path.stat().st_mode & 0o777 == 0o600
    if os.geteuid() == 0:
        assert path.stat().st_uid == pwd.getpwnam("nobody").pw_uid
