"""What a host removes from disk: unused old releases, and everything of deleted apps."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.cleanup import KEEP_RECENT, plan
from agents.fleet import App, Release
from ledger.builds import Build


def app(name: str, n: int, current: int | None = None, deployed: int | None = None) -> App:
    a = App(name, current_release=current or n, deployed=deployed)
    a.releases = {i: Release(i, f"bundle{i}", {"web": "x"}, 0, i, name,
                             Build(status="succeeded", slug_digest=f"d{i}"))
                  for i in range(1, n + 1)}  # release folders are named by slug
    return a


def test_keeps_the_newest_the_current_the_deployed_and_what_runs_here() -> None:
    blog = app("blog", 8, current=8, deployed=2)
    on_disk = {"blog": {f"d{i}" for i in range(1, 9)}}
    todo = plan(on_disk, {"blog": blog}, {"blog": {"d1"}})
    kept = on_disk["blog"] - {d for _, d in todo.releases}
    assert kept == {"d1", "d2", *(f"d{i}" for i in range(9 - KEEP_RECENT, 9))}
    assert todo.apps == []


def test_a_deleted_app_goes_once_nothing_of_it_runs_here() -> None:
    on_disk = {"gone": {"d1"}, "homeonly": set()}
    assert plan(on_disk, {}, {}).apps == ["gone", "homeonly"]
    assert plan(on_disk, {}, {"gone": {"d1"}}).apps == ["homeonly"], "still running here"
    assert plan(on_disk, {}, {}).releases == [], "its folder goes whole, not release by release"


def test_an_unknown_digest_of_a_live_app_goes_and_nothing_else_is_touched() -> None:
    blog = app("blog", 2)
    todo = plan({"blog": {"d1", "d2", "stray"}}, {"blog": blog, "other": app("other", 1)}, {})
    assert todo.releases == [("blog", "stray")] and todo.apps == []


def test_a_removal_renames_first_so_a_release_folder_is_whole_or_absent(tmp_path: Path) -> None:
    from agents.host import GONE, remove_tree

    release = tmp_path / "d1"
    (release / "pkg").mkdir(parents=True)
    (release / "pkg" / "app.py").write_text("app = 1\n")
    for p in (release / "pkg", release):
        p.chmod(0o555)  # read-only, as bundle.unpack leaves a release
    half_done = tmp_path / f"{GONE}d0-1234"  # what a killed agent left
    half_done.mkdir()
    remove_tree(release)
    remove_tree(half_done)
    remove_tree(tmp_path / "never-there")
    assert list(tmp_path.iterdir()) == []


def test_removing_a_read_only_release_changes_no_mode_through_its_links(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release is the app's to change while it runs: a folder swapped for a link to
    somewhere else must not make root chmod there. Root removes the read-only tree as it
    is, by descriptors; the link's target keeps its mode and its files. (The app's swap
    between a check and its use is simulated: every is_symlink check says no.)"""
    from agents.host import remove_tree

    monkeypatch.setattr(Path, "is_symlink", lambda self: False)

    outside = tmp_path / "platform-secrets"
    outside.mkdir(mode=0o700)
    (outside / "key").write_text("s3cret")
    release = tmp_path / "releases" / "app" / "abc"
    (release / "pkg").mkdir(parents=True)
    (release / "pkg" / "mod.py").write_text("x = 1\n")
    (release / "static").symlink_to(outside)  # as if swapped in for a folder
    for d in (release / "pkg", release):
        d.chmod(0o555)
    remove_tree(release)
    assert not any((tmp_path / "releases" / "app").iterdir())
    assert (outside.stat().st_mode & 0o777) == 0o700
    assert (outside / "key").read_text() == "s3cret"
