"""`tally run APP -- command`: a one-off in the app's environment on a host agent, as the
app's user, in a pty, its output streamed back and its exit code returned."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from agents.runs import SILENCE_S
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

    migrate = tally(cluster, "run", "-a", "oneoff", "--", "python", "release.py")
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


SLEEPER = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(300)"


@contextlib.contextmanager
def sleeper(cluster: Cluster) -> Iterator[tuple[subprocess.Popen, int]]:
    """`tally run oneoff` of a long sleep: the CLI process and the command's pid on the host
    (same machine here), once the command has printed it."""
    with subprocess.Popen([sys.executable, "-m", "tally.cli", "run", "oneoff", "--", "python",
                           "-c", SLEEPER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=tally_env(cluster)) as cli:
        assert cli.stdout is not None
        try:
            words = wait_until(lambda: (line := cli.stdout.readline().decode()).startswith(
                "pid") and line.split(), 120, "the command's first line")
            yield cli, int(words[1])
        finally:
            cli.kill()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_ctrl_c_stops_the_command_on_the_host(agent: tuple[Cluster, AgentProc]) -> None:
    cluster, _ = agent
    wait_until(lambda: tally(cluster, "run", "oneoff", "--", "true").returncode == 0, 60,
               "the app ready to run")
    with sleeper(cluster) as (cli, pid):
        # Quiet but attached: neither side gives up on the other (keep-alives both ways).
        time.sleep(SILENCE_S + 2)  # not a synchronisation: the run must outlast this
        assert cli.poll() is None and not _gone(pid)
        cli.send_signal(signal.SIGINT)
        assert cli.wait(30) == 130  # 128 + SIGINT: the command died of the interrupt
        wait_until(lambda: _gone(pid), 10, "the command gone from the host")


def test_a_command_whose_caller_vanished_is_hung_up(agent: tuple[Cluster, AgentProc]) -> None:
    cluster, _ = agent
    wait_until(lambda: tally(cluster, "run", "oneoff", "--", "true").returncode == 0, 60,
               "the app ready to run")
    with sleeper(cluster) as (cli, pid):
        cli.kill()  # kill -9: no Ctrl-C, no goodbye, as when a laptop's lid closes
        wait_until(lambda: _gone(pid), SILENCE_S + 15, "the command hung up by its agent")


def test_a_run_whose_agent_dies_ends_with_a_clear_error_and_hangs_up_the_command(
        agent: tuple[Cluster, AgentProc]) -> None:
    cluster, a = agent
    wait_until(lambda: tally(cluster, "run", "oneoff", "--", "true").returncode == 0, 60,
               "the app ready to run")
    try:
        with sleeper(cluster) as (cli, pid):
            a.kill()  # kill -9: the agent says nothing more
            wait_until(lambda: _gone(pid), 10, "the command hung up with its agent")
            assert cli.wait(SILENCE_S + 30) == 1
            assert cli.stderr is not None
            err = cli.stderr.read().decode()
            assert "lost the agent" in err and "Traceback" not in err, err
    finally:
        a.start()
