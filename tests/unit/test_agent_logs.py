"""The collector's files: lines stamped with time and instance, rotated by size, read back
across chunks; names that are not app names never become paths."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from agents.logs import Collector, chunks, tail

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_lines_are_stamped_rotated_by_size_and_read_back_in_order(tmp_path: Path) -> None:
    c = Collector(tmp_path, max_bytes=200)
    for n in range(20):
        c.write("blog", "blog.1.web.a", f"line {n}\n".encode(), NOW)
    files = chunks(tmp_path, "blog")
    assert len(files) > 2
    assert all(f.stat().st_size < 300 for f in files)
    last = tail(tmp_path, "blog", 20)
    assert [line.split(" ", 2)[2] for line in last] == [f"line {n}" for n in range(20)]
    assert last[0].startswith("2026-01-01T00:00:00.000000Z blog.1.web.a ")
    assert tail(tmp_path, "blog", 3)[-1].endswith("line 19")


def test_a_name_that_is_not_an_app_writes_nothing(tmp_path: Path) -> None:
    Collector(tmp_path / "logs").write("../etc", "x", b"owned\n", NOW)
    assert not (tmp_path / "etc").exists() and not (tmp_path / "logs").exists()
