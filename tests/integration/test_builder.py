"""`tally serve builder` against a private ledger: real bubblewrap sandboxes, real pip, and
build code that attacks the platform from inside (the "Why" of issue 11: a requirements.txt
ran its code as root on every host and printed root-only files into logs members read).

Each attack must fail or be contained; the build is then reported failed (or succeeds
harmlessly), and nothing secret appears in its output or its events."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ledger import Ledger, NewEvent
from ledger.builds import build_stream
from ledger.cluster import Cluster
from ledger.uids import build_uid
from tests.conftest import build_dir, destroy_cluster, make_cluster
from tests.fixtures.apps import app_tarball, fleet, store, tarball
from tests.fixtures.apps.fleet import Daemon
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the builder starts as root")
SECRET = "s3cr3t-platform-token-4242"


@pytest.fixture(scope="module")
def private() -> Iterator[Cluster]:
    c = make_cluster()
    home = c.root.parent
    (home / "secrets").mkdir(mode=0o700)
    (home / "secrets" / "admin.token").write_text(SECRET + "\n")
    root_only = Path("/root/.tally-test-secret")
    root_only.write_text(SECRET + "\n")
    root_only.chmod(0o600)
    yield c
    for log in home.glob("builder-*.log"):  # kept for a look after a failure
        Path(f"/tmp/tally-test-{log.name}").write_text(log.read_text())
    root_only.unlink(missing_ok=True)
    destroy_cluster(c)


def builder(cluster: Cluster, n: int, *extra: str) -> Daemon:
    return fleet.builder(cluster, n, *extra)


@pytest.fixture(scope="module")
def one_builder(private: Cluster) -> Iterator[Daemon]:
    b = builder(private, 1, "--timeout", "400", "--processes", "64", "--disk-mb", "200")
    b.start()
    yield b
    b.kill()


def files(entries: dict[str, bytes | str], mode: int = 0o644) -> bytes:
    out = []
    for name, data in entries.items():
        raw = data.encode() if isinstance(data, str) else data
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(raw), 0o755 if name.startswith("bin/") else mode
        out.append((info, raw))
    return tarball(out)


UID_RANGE = tuple(int(x) for x in os.environ["TALLY_APP_UIDS"].split("-"))
"""The session's app uids (tests/conftest.py); builds run in the range above it."""
APP_UIDS = itertools.count(UID_RANGE[1] - 99)
"""Apps' uids here: the top of the session's range, clear of apps the API hands out."""


def deploy(ledger: Ledger, home: Path, app: str, bundle: bytes) -> str:
    """AppCreated (with its uid) + ReleaseCreated as the API appends them; the release's
    build stream."""
    digest = store(bundle, home / "bundles")
    result = ledger.append(f"app-{app}", [
        NewEvent("AppCreated", {"name": app, "owner": "ann", "uid": next(APP_UIDS)}),
        NewEvent("ReleaseCreated", {"app": app, "release": 1, "bundle_digest": digest,
                                    "procfile": {"web": "gunicorn app:app"},
                                    "config_version": 0})])
    return build_stream(app, result.versions[-1])


def outcome(ledger: Ledger, stream: str, timeout: float = 120) -> Any:
    def done() -> Any:
        return next((e for e in ledger.read_stream(stream)
                     if e.type in ("BuildSucceeded", "BuildFailed")), None)
    return wait_until(done, timeout, f"an outcome in {stream}", interval=0.2)


def output(home: Path, app: str, stream: str) -> str:
    return (home / "builds" / app / f"{stream}.log").read_text()


def evil_sdist(targets: list[str]) -> bytes:
    """An sdist whose in-tree build backend probes the platform, then fails (so pip shows
    what it printed)."""
    backend = f'''
import os, subprocess
def _probe():
    out = ["EVIL uid=" + subprocess.run(["id", "-u"], capture_output=True, text=True).stdout]
    for path in {targets!r}:
        try:
            if os.path.isdir(path):
                out.append("EVIL listed " + path + ": " + repr(os.listdir(path)))
            else:
                out.append("EVIL read " + path + ": " + open(path).read())
        except Exception as exc:
            out.append("EVIL cannot " + path + ": " + type(exc).__name__)
    try:
        open("/usr/evil", "w").write("x")
        out.append("EVIL wrote /usr/evil")
    except Exception as exc:
        out.append("EVIL cannot write /usr/evil: " + type(exc).__name__)
    return chr(10).join(out)
def get_requires_for_build_wheel(config_settings=None):
    return []
def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise RuntimeError(_probe())
'''
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in {
            "evil-1.0/pyproject.toml": ('[build-system]\nrequires = []\n'
                                        'build-backend = "backend"\nbackend-path = ["."]\n'
                                        '[project]\nname = "evil"\nversion = "1.0"\n'),
            "evil-1.0/backend.py": backend,
            "evil-1.0/PKG-INFO": "Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n",
        }.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def test_install_time_code_runs_unprivileged_and_reads_no_secret(
        private: Cluster, one_builder: Daemon) -> None:
    home = private.root.parent
    targets = [str(home), str(home / "secrets" / "admin.token"), str(private.credentials_file),
               "/root", "/root/.tally-test-secret", "/etc/shadow",
               str(home / "agents"), str(Path.home() / ".config")]
    bundle = files({"Procfile": "web: gunicorn app:app\n",
                    "requirements.txt": "--no-index\n-f ./dists\nevil==1.0\n",
                    "dists/evil-1.0.tar.gz": evil_sdist(targets)})
    with Ledger(private.dsn()) as ledger:
        stream = deploy(ledger, home, "evil", bundle)
        failed = outcome(ledger, stream)
        events = ledger.read_stream(stream)
    text = output(home, "evil", stream)
    assert failed.type == "BuildFailed", text
    uid = int(text.split("EVIL uid=")[1].split()[0])
    assert uid != 0, "install-time code ran as root"
    for target in targets:
        assert f"EVIL cannot {target}:" in text, (target, text)
    assert "EVIL cannot write /usr/evil" in text
    assert SECRET not in text
    assert not any(SECRET in str(e.data) for e in events)
    assert "pip install -r requirements.txt failed" in failed.data["reason"]


def test_requirements_naming_a_root_only_file_cannot_print_it(
        private: Cluster, one_builder: Daemon) -> None:
    home = private.root.parent
    bundle = files({"Procfile": "web: x\n",
                    "requirements.txt": f"-r /root/.tally-test-secret\n-r {home}/secrets/"
                                        "admin.token\n"})
    with Ledger(private.dsn()) as ledger:
        stream = deploy(ledger, home, "rootfile", bundle)
        failed = outcome(ledger, stream)
    text = output(home, "rootfile", stream)
    assert failed.type == "BuildFailed"
    assert "No such file or directory" in text or "Could not open" in text, text
    assert SECRET not in text and SECRET not in str(failed.data)


def test_a_fork_bomb_is_contained_and_the_build_fails(
        private: Cluster, one_builder: Daemon) -> None:
    bundle = files({"Procfile": "web: x\n", "requirements.txt": "",
                    "bin/pre_compile": "#!/bin/bash\nbomb() { bomb | bomb & }; bomb\n"
                                       "sleep 5; echo survived; exit 7\n"})
    with Ledger(private.dsn()) as ledger:
        stream = deploy(ledger, private.root.parent, "forky", bundle)
        failed = outcome(ledger, stream)
    assert failed.type == "BuildFailed"
    assert not [p for p in Path("/sys/fs/cgroup/pids/tally-builds").glob("*forky*")], \
        "the build's cgroup is left behind"


def test_filling_the_disk_is_stopped(private: Cluster, one_builder: Daemon) -> None:
    bundle = files({"Procfile": "web: x\n", "requirements.txt": "",
                    "bin/post_compile": "#!/bin/bash\n"
                                        "head -c 300000000 /dev/zero > /app/big\n"})
    with Ledger(private.dsn()) as ledger:
        stream = deploy(ledger, private.root.parent, "filler", bundle)
        failed = outcome(ledger, stream)
    assert failed.type == "BuildFailed"
    assert "bin/post_compile failed" in failed.data["reason"] or "more than" in \
        failed.data["reason"]


def test_two_builders_build_a_release_once_and_a_killed_builders_build_is_taken_over(
        private: Cluster, one_builder: Daemon) -> None:
    home = private.root.parent
    second = builder(private, 2, "--lease", "3")
    second.start()
    try:
        slow = files({"Procfile": "web: x\n", "requirements.txt": "",
                      "bin/pre_compile": "#!/bin/bash\nfor i in 1 2 3 4 5 6; do echo tick $i; "
                                         "sleep 1; done\n"})
        with Ledger(private.dsn()) as ledger:
            stream = deploy(ledger, home, "twice", slow)
            done = outcome(ledger, stream)
            events = ledger.read_stream(stream)
        assert done.type == "BuildSucceeded"
        assert [e.type for e in events].count("BuildStarted") == 1, "built twice"
    finally:
        second.kill()

    one_builder.kill()  # only the short-lease builder may take this one
    third = builder(private, 3, "--lease", "3")
    fourth = builder(private, 4, "--lease", "3")
    third.start()
    try:
        with Ledger(private.dsn()) as ledger:
            stream = deploy(ledger, home, "taken", slow)
            wait_until(lambda: any(e.type == "BuildStarted" for e in ledger.read_stream(
                stream)), 60, "b3 claimed the build", interval=0.1)
            third.kill()  # kill -9, mid-build
            fourth.start()
            done = outcome(ledger, stream)
            starts = [e.data for e in ledger.read_stream(stream) if e.type == "BuildStarted"]
        assert done.type == "BuildSucceeded"
        assert [(s["builder"], s["attempt"]) for s in starts] == [("b3", 1), ("b4", 2)]
    finally:
        fourth.kill()
        third.kill()
        one_builder.start()


def test_an_apps_build_cannot_write_another_apps_build_cache(
        private: Cluster, one_builder: Daemon) -> None:
    """Each app builds as its own uid (the app's, moved above the apps' range) into a cache
    only that uid may open: a process with app A's build's credentials, wherever it runs
    (a leftover of A's build, an escape from its sandbox), cannot touch B's cache."""
    home = private.root.parent
    work = build_dir(home)
    bundle = files({"Procfile": "web: x\n", "requirements.txt": "",
                    "bin/post_compile": "#!/bin/bash\necho BUILD uid=$(id -u)\n"
                                        "echo mine > /cache/kept\n"})
    uids, texts = {}, {}
    with Ledger(private.dsn()) as ledger:
        for app in ("cachea", "cacheb"):
            stream = deploy(ledger, home, app, bundle)
            done = outcome(ledger, stream)
            texts[app] = output(home, app, stream)
            assert done.type == "BuildSucceeded", texts[app]
            created = ledger.read_stream(f"app-{app}")[0]
            uids[app] = build_uid(created.data["uid"], *UID_RANGE)
    for app, uid in uids.items():
        assert f"BUILD uid={uid}" in texts[app], texts[app]
        cache = work / "cache" / app
        assert (cache.stat().st_uid, cache.stat().st_mode & 0o777) == (uid, 0o700)
        assert (cache / "kept").read_text() == "mine\n"
    assert len(set(uids.values())) == 2 and 0 not in uids.values()
    victim = work / "cache" / "cacheb"
    attack = subprocess.run(
        ["/bin/sh", "-c", f"echo poisoned > {victim}/kept; echo x > {victim}/new; "
                          f"ls {victim}; rm -rf {victim}/pip"],
        user=uids["cachea"], group=uids["cachea"], extra_groups=[], capture_output=True,
        text=True)
    assert "Permission denied" in attack.stderr, attack
    assert (victim / "kept").read_text() == "mine\n"
    assert not (victim / "new").exists()


def test_the_builder_is_a_fleet_host_without_ledger_credentials(
        private: Cluster, one_builder: Daemon) -> None:
    """It speaks to the API only, with its builder token: its TALLY_HOME holds nothing of
    the platform's, its environment no ledger password, and it keeps no connection to the
    ledger (it built the releases above through the API alone)."""
    assert one_builder.proc is not None
    proc = psutil.Process(one_builder.proc.pid)
    env = proc.environ()
    own = Path(env["TALLY_HOME"])
    assert own != private.root.parent and not (own / "ledger").exists()
    passwords = json.loads(private.credentials_file.read_text())
    assert not [p for p in passwords.values() if isinstance(p, str) and
                any(p in v for v in env.values())]
    ledger_ports = set(private.spec.ports)
    assert not [c for c in proc.net_connections(kind="tcp")
                if c.raddr and c.raddr.port in ledger_ports]


@pytest.mark.parametrize("sample, tool", [("uvlock", "uv sync"), ("poetrylock", "poetry install")])
def test_a_lock_file_is_installed_with_its_tool(private: Cluster, one_builder: Daemon,
                                                sample: str, tool: str) -> None:
    """uv.lock with uv, poetry.lock with Poetry (each fetched from PyPI into the app's
    build cache): the locked dependency is in the slug's virtualenv."""
    home = private.root.parent
    with Ledger(private.dsn()) as ledger:
        stream = deploy(ledger, home, f"lock-{sample}", app_tarball(sample))
        done = outcome(ledger, stream, timeout=600)
    text = output(home, f"lock-{sample}", stream)
    assert done.type == "BuildSucceeded", text
    assert f"$ /cache/tools/{tool.split()[0]}/bin/{tool}" in text, text
    assert "IMPORTED itsdangerous from /app/.venv" in text, text


def test_an_interpreter_the_hosts_lack_is_a_build_error_naming_theirs(
        private: Cluster, one_builder: Daemon) -> None:
    bundle = files({"Procfile": "web: x\n", "requirements.txt": "", ".python-version": "3.7\n"})
    with Ledger(private.dsn()) as ledger:
        stream = deploy(ledger, private.root.parent, "oldpy", bundle)
        failed = outcome(ledger, stream)
    assert failed.type == "BuildFailed"
    have = sorted({p.name.removeprefix("python") for p in Path("/usr/bin").glob("python3.*")
                   if p.name.removeprefix("python").replace(".", "").isdigit()})
    assert failed.data["reason"] == ("Python 3.7 (asked for in .python-version) is not on the "
                                     f"hosts; they have Python {', '.join(have)}")


def test_a_slug_over_the_apps_slug_quota_fails_the_build(
        private: Cluster, one_builder: Daemon) -> None:
    """The builder enforces slug_mb (the API refuses a larger upload too)."""
    bundle = files({"Procfile": "web: x\n", "requirements.txt": "",
                    "bin/post_compile": "#!/bin/bash\nhead -c 3000000 /dev/urandom > /app/blob\n"})
    with Ledger(private.dsn()) as ledger:
        ledger.append("quota-app:bigslug", [NewEvent("QuotaSet", {
            "subject": "app", "name": "bigslug", "slug_mb": 1})])
        stream = deploy(ledger, private.root.parent, "bigslug", bundle)
        failed = outcome(ledger, stream)
    assert failed.type == "BuildFailed"
    assert "over the app's slug_mb quota of 1 MB" in failed.data["reason"], failed.data


def test_a_build_reaches_the_package_index_and_nothing_else(
        private: Cluster, one_builder: Daemon) -> None:
    """Under the builder's nftables rules (agents/buildnet.py): PyPI answers; the ledger,
    the API, and a host of the outside world that is no index do not."""
    api_port = int(fleet.api_for(private).url.rpartition(":")[2])
    targets = {"pypi": ("pypi.org", 443), "ledger": ("127.0.0.1", private.spec.ports[0]),
               "api": ("127.0.0.1", api_port), "outside": ("1.1.1.1", 80),
               "lan-dns-over-tcp-elsewhere": ("9.9.9.9", 53)}
    probe = "".join(
        f"try:\n    socket.create_connection({addr!r}, timeout=5).close()\n"
        f"    print('NET {name} open')\n"
        f"except OSError as exc:\n    print('NET {name} closed', type(exc).__name__)\n"
        for name, addr in targets.items())
    bundle = files({"Procfile": "web: x\n", "requirements.txt": "",
                    "probe.py": "import socket\n" + probe,
                    "bin/post_compile": "#!/bin/bash\npython /app/probe.py\n"})
    with Ledger(private.dsn()) as ledger:
        stream = deploy(ledger, private.root.parent, "netprobe", bundle)
        done = outcome(ledger, stream)
    text = output(private.root.parent, "netprobe", stream)
    assert done.type == "BuildSucceeded", text
    assert "NET pypi open" in text, text
    for name in ("ledger", "api", "outside", "lan-dns-over-tcp-elsewhere"):
        assert f"NET {name} closed" in text, (name, text)

    # Its rules flushed behind its back (an `nft flush ruleset`, another agent's cleanup):
    # the next build is confined again, never built on the host's whole network.
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                            check=True).stdout.split()
    assert one_builder.proc is not None
    mine = [t for t in tables
            if t.startswith("tally_builds_") and t.endswith(f"_p{one_builder.proc.pid}")]
    assert mine, tables
    for table in mine:
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)
    again = files({"Procfile": "web: x\n", "requirements.txt": "",  # other code: a build
                   "probe.py": "import socket\n" + probe + "# v2\n",
                   "bin/post_compile": "#!/bin/bash\npython /app/probe.py\n"})
    with Ledger(private.dsn()) as ledger:  # the same app, so the same build uid
        result = ledger.append("app-netprobe", [NewEvent("ReleaseCreated", {
            "app": "netprobe", "release": 2,
            "bundle_digest": store(again, private.root.parent / "bundles"),
            "procfile": {"web": "gunicorn app:app"}, "config_version": 0})])
        stream = build_stream("netprobe", result.versions[-1])
        done = outcome(ledger, stream)
    text = output(private.root.parent, "netprobe", stream)
    assert done.type == "BuildSucceeded", text
    assert "NET ledger closed" in text and "NET outside closed" in text, text


def test_the_api_killed_mid_build_costs_no_rebuild(private: Cluster,
                                                   one_builder: Daemon) -> None:
    """The builder's peer is the API: killed -9 while a build runs and started again, the
    builder keeps the build's output for it and reports the outcome once it answers (the
    claim outlives a short absence): one attempt, the whole output."""
    api = fleet.api_for(private)
    slow = files({"Procfile": "web: x\n", "requirements.txt": "",
                  "bin/pre_compile": "#!/bin/bash\nfor i in 1 2 3 4 5 6; do echo tick $i; "
                                     "sleep 1; done\n"})
    with Ledger(private.dsn()) as ledger:
        stream = deploy(ledger, private.root.parent, "apiaway", slow)
        wait_until(lambda: any(e.type == "BuildStarted" for e in ledger.read_stream(stream)),
                   60, "the build claimed", interval=0.1)
        said = one_builder.log().count("the API is away")
        api.kill()
        try:
            wait_until(lambda: one_builder.log().count("the API is away") > said, 25,
                       "the builder meeting the API away", interval=0.2)
        finally:
            api.start()
        done = outcome(ledger, stream)
        events = ledger.read_stream(stream)
    text = output(private.root.parent, "apiaway", stream)
    assert done.type == "BuildSucceeded", text
    assert [e.type for e in events].count("BuildStarted") == 1, "built again"
    assert "tick 1" in text and "tick 6" in text and "Build succeeded" in text, text
