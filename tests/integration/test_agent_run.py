"""`tally run APP -- command`: a one-off in the app's environment on a host agent, as the
app's user, in a pty, its output streamed back and its exit code returned."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from ledger import Ledger
from ledger.cluster import Cluster
from tests.conftest import destroy_cluster, free_ports, make_cluster, tally_env
from tests.fixtures.apps.fleet import AgentProc, create_app, release
from tests.waiting import wait_until

PROBE = ("import os, sys; print('tty', os.isatty(1), 'uid', os.getuid(), 'greeting', "
         "os.environ['GREETING'], 'cwd-has-procfile', os.path.exists('Procfile')); sys.exit(7)")

LIMITS = ("import resource as r; print(*r.getrlimit(r.RLIMIT_NOFILE), "
          "r.getrlimit(r.RLIMIT_AS)[0])")


@pytest.fixture(scope="module")
def agent() -> Iterator[tuple[Cluster, AgentProc]]:
    cluster = make_cluster()
    low = free_ports(1)[0]
    a = AgentProc(cluster, "hr", (low, low + 4))
    a.start()
    try:
        yield cluster, a
    finally:
        a.kill()
        a.kill_apps()
        destroy_cluster(cluster)


def tally(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tally.cli", *args], capture_output=True,
                          text=True, env=tally_env(cluster), timeout=180)


def test_a_one_off_runs_in_the_apps_environment_and_returns_its_exit_code(
        agent: tuple[Cluster, AgentProc]) -> None:
    cluster, _ = agent
    with Ledger(cluster.dsn()) as ledger:
        create_app(ledger, "oneoff", {"GREETING": "salut"})
        release(ledger, cluster.root.parent, "oneoff", "migrating", 1, config_version=1)
    out = wait_until(lambda: (r := tally(cluster, "run", "oneoff", "--", "python", "-c",
                                         PROBE)).returncode != 1 and r, 60, "a run")
    assert out.returncode == 7, out.stderr
    words = out.stdout.split()
    assert words[words.index("tty") + 1] == "True"
    assert words[words.index("greeting") + 1] == "salut"
    assert words[words.index("cwd-has-procfile") + 1] == "True"
    assert int(words[words.index("uid") + 1]) != 0

    migrate = tally(cluster, "run", "oneoff", "--", "python", "release.py")
    assert migrate.returncode == 0 and "migrated" in migrate.stdout

    limits = tally(cluster, "run", "oneoff", "--", "python", "-c", LIMITS)
    assert limits.stdout.split() == ["4096", "4096", str(1024 * 2**20)], limits.stdout


def test_bad_runs_fail_with_one_clear_line(agent: tuple[Cluster, AgentProc]) -> None:
    cluster, _ = agent
    missing = tally(cluster, "run", "nosuchapp", "--", "true")
    assert missing.returncode == 1 and "no app named 'nosuchapp'" in missing.stderr
    wait_until(lambda: tally(cluster, "run", "oneoff", "--", "true").returncode == 0, 60,
               "the app ready to run")
    absent = tally(cluster, "run", "oneoff", "--", "no-such-program")
    assert absent.returncode == 1 and "cannot start 'no-such-program'" in absent.stderr
    assert "Traceback" not in absent.stderr + missing.stderr
