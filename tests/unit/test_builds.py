"""Builds without a builder: the claim rules (ledger/builds.py, api/buildqueue.py), the
placer's gate on built releases, health verdicts, slug packing and unpacking, and what
`tally deploy` packs. Files in tmp_path; no PostgreSQL, no sandbox."""

from __future__ import annotations

import subprocess
import tarfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agents import buildnet, slug
from agents.fleet import Fleet
from agents.health import Check
from agents.placement import decide
from api.buildqueue import Unbuilt, earlier_slug, offered
from api.state import fold as fold_app
from ledger.builds import Build, build_stream, fold
from ledger.events import RecordedEvent
from tally import packing

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Stream:
    def __init__(self) -> None:
        self.fleet = Fleet()
        self.versions: dict[str, int] = {}
        self.n = 0
        self.events: list[RecordedEvent] = []

    def add(self, stream: str, type_: str, at: datetime = T0, **data: Any) -> RecordedEvent:
        self.versions[stream] = self.versions.get(stream, 0) + 1
        self.n += 1
        e = RecordedEvent(self.n, self.n, stream, self.versions[stream], type_, data, {}, at)
        self.fleet.apply(e)
        self.events.append(e)
        return e


def blog(s: Stream, digest: str = "a" * 64, release: int = 1) -> str:
    if "app-blog" not in s.versions:
        s.add("app-blog", "AppCreated", name="blog", owner="ann")
        s.add("host-h1", "HostRegistered", host_id="h1", address="127.0.0.1", port_min=7000,
              port_max=7009, capacity=5)
        s.add("heartbeat-h1", "HostHeartbeat", host_id="h1")
    s.add("app-blog", "ReleaseCreated", app="blog", release=release, bundle_digest=digest,
          procfile={"web": "gunicorn app:app"}, config_version=0)
    return build_stream("blog", s.versions["app-blog"])


def test_a_claim_lasts_its_lease_and_renewals_extend_it() -> None:
    s = Stream()
    stream = blog(s)
    started = s.add(stream, "BuildStarted", app="blog", release=1, builder="b1", lease_s=30)
    b = fold([started])
    assert b.status == "building" and not b.claimable(T0 + timedelta(seconds=29))
    assert b.claimable(T0 + timedelta(seconds=30))
    renewed = s.add(stream, "BuildClaimRenewed", T0 + timedelta(seconds=20), app="blog",
                    release=1, builder="b1")
    b = fold([started, renewed])
    assert not b.claimable(T0 + timedelta(seconds=45)) and b.version == 2
    done = s.add(stream, "BuildSucceeded", app="blog", release=1, slug_digest="c" * 64,
                 size_bytes=10, seconds=3.0)
    assert not fold([started, renewed, done]).claimable(T0 + timedelta(days=1))


def _offers(s: Stream, now: datetime) -> tuple[list[int], dict[int, Build]]:
    """What the API offers builders of app blog: release numbers, and their builds."""
    unbuilt = Unbuilt()
    unbuilt.apply(s.events)
    state = fold_app("blog", [e for e in s.events if e.stream == "app-blog"])
    builds = {r.number: fold([e for e in s.events
                              if e.stream == build_stream("blog", r.stream_version)])
              for r in state.releases if r.stream_version in unbuilt.apps.get("blog", set())}
    return [r.number for r in offered(state, builds, now)], builds


def test_builders_are_offered_unclaimed_and_expired_builds_newest_first() -> None:
    s = Stream()
    blog(s, "a" * 64, 1)
    second = blog(s, "b" * 64, 2)
    assert _offers(s, T0)[0] == [2, 1]
    s.add(second, "BuildStarted", app="blog", release=2, builder="b1", lease_s=10)
    assert _offers(s, T0 + timedelta(seconds=5))[0] == [1]
    numbers, builds = _offers(s, T0 + timedelta(seconds=11))
    assert numbers == [2, 1] and builds[2].attempt + 1 == 2, "taken again: attempt 2"
    s.add(second, "BuildSucceeded", app="blog", release=2, slug_digest="c" * 64,
          size_bytes=1, seconds=1.0)
    numbers, builds = _offers(s, T0 + timedelta(seconds=11))
    assert numbers == [1] and 2 not in builds, "an outcome leaves the queue"


def test_a_release_of_code_built_before_reuses_its_slug() -> None:
    s = Stream()
    one = blog(s, "a" * 64, 1)
    s.add(one, "BuildStarted", app="blog", release=1, builder="b1", lease_s=10)
    s.add(one, "BuildSucceeded", app="blog", release=1, slug_digest="c" * 64, size_bytes=1,
          seconds=1.0)
    blog(s, "a" * 64, 2)  # config:set or rollback: same bundle
    blog(s, "d" * 64, 3)  # other code
    state = fold_app("blog", [e for e in s.events if e.stream == "app-blog"])
    built = {1: fold([e for e in s.events if e.stream == one])}
    found = earlier_slug(state, state.releases[1], built)
    assert found is not None and found[0] == 1 and found[1].slug_digest == "c" * 64
    assert earlier_slug(state, state.releases[2], built) is None


def placer_says(s: Stream) -> list[Any]:
    """The placer's decisions, its announcement of its own timings left out."""
    return [e for a in decide(s.fleet, T0) for e in a.events if e.type != "LivenessSet"]


def test_the_placer_places_only_built_releases_and_fails_a_failed_build() -> None:
    s = Stream()
    stream = blog(s)
    assert placer_says(s) == []
    s.add(stream, "BuildStarted", app="blog", release=1, builder="b1", lease_s=10)
    s.add(stream, "BuildFailed", app="blog", release=1, reason="pip install failed",
          log_tail=["ERROR: No matching distribution"])
    (failed,) = placer_says(s)
    assert failed.type == "ReleaseFailed" and failed.data["reason"] == (
        "build failed: pip install failed")
    s.add("placement-blog", "ReleaseFailed", **failed.data)
    assert placer_says(s) == [], "nothing, ever"

    built = blog(s, "b" * 64, 2)
    s.add(built, "BuildStarted", app="blog", release=2, builder="b1", lease_s=10)
    s.add(built, "BuildSucceeded", app="blog", release=2, slug_digest="c" * 64, size_bytes=1,
          seconds=1.0)
    placed = placer_says(s)
    assert [(e.type, e.data["release"]) for e in placed] == [("InstancePlaced", 2)]


def test_a_build_event_of_a_deleted_apps_release_is_not_taken_for_the_new_one() -> None:
    s = Stream()
    old = blog(s)
    s.add("app-blog", "AppDeleted", name="blog")
    s.add("app-blog", "AppCreated", name="blog", owner="ann")
    new = blog(s)
    s.add(old, "BuildFailed", app="blog", release=1, reason="late")
    assert old != new and s.fleet.apps["blog"].releases[1].build == Build()


def test_health_checks_from_config() -> None:
    default = Check.from_config({}, 1.0)
    assert default.path == "" and default.timeout == 1.0
    http = Check.from_config({"TALLY_HEALTHCHECK_PATH": "healthz",
                              "TALLY_HEALTHCHECK_STATUS": "200,3xx",
                              "TALLY_HEALTHCHECK_TIMEOUT": "2.5"}, 1.0)
    assert (http.path, http.timeout) == ("/healthz", 2.5)
    assert http.expects(200) and http.expects(302) and not http.expects(204)
    assert not http.expects(500)
    assert Check.from_config({"TALLY_HEALTHCHECK_TIMEOUT": "soon"}, 1.0).timeout == 1.0


def _entries(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_a_slug_keeps_files_folders_and_links_owned_by_root_without_setuid(
        tmp_path: Path) -> None:
    root = tmp_path / "app"
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").symlink_to("/usr/bin/python3")
    (root / "app.py").write_text("x = 1\n")
    (root / "app.py").chmod(0o4777)
    (root / "pipe").mkdir()
    import os
    os.mkfifo(root / "fifo")
    digest, size = slug.pack(root, tmp_path / "store")
    path = tmp_path / "store" / f"{digest}.tar.gz"
    assert path.stat().st_size == size
    entries = _entries(path)
    assert "fifo" not in entries
    assert entries[".venv/bin/python"].linkname == "/usr/bin/python3"
    assert entries["app.py"].mode == 0o755 and entries["app.py"].uid == 0


def test_two_instances_starting_together_unpack_one_slug_once(tmp_path: Path) -> None:
    root = tmp_path / "app"
    (root / "pkg").mkdir(parents=True)
    for i in range(200):
        (root / "pkg" / f"m{i}.py").write_text("x" * 1000)
    digest, _ = slug.pack(root, tmp_path / "store")
    found: list[Path] = []
    errors: list[BaseException] = []

    def unpack() -> None:
        try:
            found.append(slug.unpack(tmp_path / "store" / f"{digest}.tar.gz", digest,
                                     tmp_path / "releases", None))
        except BaseException as exc:  # the race gave [Errno 39] Directory not empty
            errors.append(exc)

    threads = [threading.Thread(target=unpack) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(found)) == 1
    assert len(list((found[0] / "pkg").iterdir())) == 200


def test_a_slug_with_a_name_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    import hashlib
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / f"{digest}.tar.gz").write_bytes(data)
    with pytest.raises(slug.SlugRefused, match="outside"):
        slug.unpack(tmp_path / f"{digest}.tar.gz", digest, tmp_path / "releases", None)
    with pytest.raises(slug.SlugRefused, match="mismatch"):
        slug.unpack(tmp_path / f"{digest}.tar.gz", "0" * 64, tmp_path / "other", None)


def test_deploy_packs_no_secrets_or_local_databases_and_honours_slugignore(
        tmp_path: Path) -> None:
    app = tmp_path / "app"
    for name in ["Procfile", "app.py", ".env", ".env.local", "db.sqlite3", "data/x.db",
                 ".venv/bin/python", "__pycache__/app.pyc", "docs/big.pdf", "notes.txt",
                 "static/site.css"]:
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text("x")
    (app / ".slugignore").write_text("# large files\ndocs/\n*.txt\n")
    assert packing.files_of(app) == [".slugignore", "Procfile", "app.py", "static/site.css"]


def test_deploy_packs_what_git_tracks_in_a_work_tree(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    for name in ["Procfile", "app.py", "untracked.py", ".env"]:
        (app / name).write_text("x")
    git = ["git", "-C", str(app), "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "Procfile", "app.py", ".env"], check=True)
    assert packing.files_of(app) == [".env", "Procfile", "app.py"]  # committed: as Heroku
    data, count = packing.pack(app)
    assert count == 3 and data[:2] == b"\x1f\x8b"


def test_app_config_never_steers_the_loader_of_the_sandbox_itself() -> None:
    """Config vars reach bwrap's own environment (not setuid here): LD_AUDIT=/tmp/x.so
    would run code as the build user before any namespace exists. They are dropped."""
    from agents.sandbox import loader_safe

    env = {"PATH": "/usr/bin", "SECRET_KEY": "s", "LD_AUDIT": "/tmp/x.so",
           "LD_PRELOAD": "/tmp/y.so", "GCONV_PATH": "/tmp", "GLIBC_TUNABLES": "x=1"}
    assert loader_safe(env) == {"PATH": "/usr/bin", "SECRET_KEY": "s"}


def test_builds_may_reach_the_index_and_its_resolvers_only(tmp_path: Path) -> None:
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://mirror.example.org/simple\n"
                    "find-links = /opt/wheels\n")
    hosts = buildnet.index_hosts({"PIP_EXTRA_INDEX_URL": "http://pkgs.local:8080/simple",
                                  "PIP_FIND_LINKS": "https://ignored.example/"}, [conf],
                                 ["internal.example"])
    assert hosts == ["files.pythonhosted.org", "internal.example", "mirror.example.org",
                     "pkgs.local", "pypi.org"]
    assert buildnet.resolvers("# x\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\n"
                              "search lan\n") == ["10.0.0.53", "fe80::1"]
    script = buildnet.render("t1", buildnet.Allowed({300_001, 300_002},
                                                    {"151.101.0.223", "2a04:4e42::223"},
                                                    {"10.0.0.53"}))
    who = "meta skuid { 300001, 300002 }"
    assert f"{who} ip daddr {{ 10.0.0.53 }} meta l4proto {{ tcp, udp }} th dport 53 accept" \
        in script
    assert f"{who} ip daddr {{ 151.101.0.223 }} tcp dport {{ 80, 443 }} accept" in script
    assert f"{who} ip6 daddr {{ 2a04:4e42::223 }} tcp dport {{ 80, 443 }} accept" in script
    assert script.rstrip().splitlines()[-3] == f"    {who} reject", "the rest: refused"
    assert "skuid" not in buildnet.render("t1", buildnet.Allowed(dns={"10.0.0.53"}))


@pytest.mark.parametrize(("text", "skip"), [
    ("flask==3.1.3\n# a comment\ngunicorn==27.0.1  # pinned\n\n", True),
    ("-e .\nflask==3.1.3\n", True),
    ("-r base.txt\n", False),
    ("--no-index\n-f ./dists\nevil==1.0\n", False),
    ("./vendor/pkg\n", False),
    ("pkg @ https://example.org/pkg.whl\n", False),
    ("--index-url https://mirror.example/simple\nflask\n", False),
])
def test_pip_is_skipped_only_when_the_requirements_text_pins_everything(
        tmp_path: Path, text: str, skip: bool) -> None:
    """A warm build with unchanged requirements runs no pip, unless what they name may
    have changed without their text changing (a nested file, local paths, URLs)."""
    from agents import buildpack

    path = tmp_path / "requirements.txt"
    path.write_text(text)
    assert buildpack.settled(path) is skip
