"""Build output on the API's machine, where apps may also run: closed to every other uid
(the review found TALLY_HOME/builds 0755 with 0644 logs, readable by any app)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from api.routes_builds import write_output
from tally.config import Config
from tally.platform import close_home


def test_build_output_is_the_apis_alone_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "builds" / "blog" / "build-blog.2.log"
    old = os.umask(0)
    try:
        write_output(path, "Collecting flask\n", fresh=True)
        write_output(path, "Installed\n")
    finally:
        os.umask(old)
    assert path.read_text() == "Collecting flask\nInstalled\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert {p.stat().st_mode & 0o777 for p in (path.parent, path.parent.parent)} == {0o700}
    write_output(path, "a new attempt\n", fresh=True)
    assert path.read_text() == "a new attempt\n"


def test_a_build_printing_without_end_keeps_8_mib(tmp_path: Path) -> None:
    from api.routes_builds import CUT, OUTPUT_MAX

    path = tmp_path / "builds" / "blog" / "build-blog.3.log"
    write_output(path, "start\n", fresh=True)
    for _ in range(12):
        write_output(path, "y" * (1 << 20))
    data = path.read_bytes()
    assert len(data) == OUTPUT_MAX + len(CUT) and data.endswith(CUT.encode())
    write_output(path, "a new attempt\n", fresh=True)
    assert path.read_text() == "a new attempt\n"


def test_close_home_closes_the_build_logs(tmp_path: Path) -> None:
    cfg = Config.from_env({"TALLY_HOME": str(tmp_path)})
    cfg.build_logs_dir.mkdir(mode=0o755)
    close_home(cfg)
    assert cfg.build_logs_dir.stat().st_mode & 0o777 == 0o700


def test_a_link_planted_as_the_output_is_not_followed(tmp_path: Path) -> None:
    path = tmp_path / "builds" / "blog" / "build-blog.2.log"
    path.parent.mkdir(parents=True)
    target = tmp_path / "elsewhere"
    target.write_text("kept\n")
    path.symlink_to(target)
    with pytest.raises(OSError):
        write_output(path, "x")
    assert target.read_text() == "kept\n"


def test_the_builder_refuses_a_work_folder_another_user_made(tmp_path: Path) -> None:
    """The review's case: an app that made /var/tmp/tally-builds before the builder came
    owned the folder root then chowns and truncates under, for every build."""
    from agents.builder import check_root_owned
    from agents.sandbox import SandboxUnavailable

    tmp_path.chmod(0o755)
    made = tmp_path / "tally-builds"
    made.mkdir()
    check_root_owned(made / "abc")  # root's, and the part below it does not exist yet
    os.chown(made, 65534, 65534)
    with pytest.raises(SandboxUnavailable, match="not a folder of root's"):
        check_root_owned(made / "abc")
    os.chown(made, 0, 0)
    made.chmod(0o777)
    with pytest.raises(SandboxUnavailable, match="may be changed by other users"):
        check_root_owned(made / "abc")
    made.chmod(0o755)
    (tmp_path / "link").symlink_to(made)
    with pytest.raises(SandboxUnavailable, match="not a folder of root's"):
        check_root_owned(tmp_path / "link" / "abc")


def test_a_build_line_without_end_is_cut_not_held_whole() -> None:
    """Review 4: the builder (root) read each line of a build's output whole; 200 MB with
    no newline grew it by 400 MiB. Lines are cut at LINE_CHARS, the rest dropped as read."""
    import subprocess
    import sys
    import tracemalloc

    from agents import sandbox

    script = ("import sys; w = sys.stdout.write; w('x' * 3_000_000); w('\\nnext\\n');"
              "w('y' * 10); sys.stdout.flush()")
    seen: list[str] = []
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE) as proc:
        tracemalloc.start()
        try:
            sandbox._pump(proc, seen.append)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert seen == ["x" * sandbox.LINE_CHARS, "next", "y" * 10]
    assert peak < 2**20, f"{peak} bytes held for a 3 MB line"
