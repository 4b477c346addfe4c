"""Logs end to end: an instance's output travels from its host agent over ZeroMQ PUSH to
`tally serve collector`, into the app's chunked files, and out of `tally logs [-f]`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from ledger import Ledger
from ledger.cluster import Cluster
from tests.conftest import destroy_cluster, free_ports, make_cluster, tally_env
from tests.fixtures.apps.fleet import AgentProc, Daemon, placer, release
from tests.fixtures.apps.fleet import create_app as create
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def private() -> Iterator[Cluster]:
    c = make_cluster()
    yield c
    destroy_cluster(c)


def tally(cluster: Cluster, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tally.cli", *args], capture_output=True,
                          text=True, env=tally_env(cluster, **env), timeout=30)


def test_logs_reach_the_collector_and_tally_logs(private: Cluster) -> None:
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    collector = Daemon(private, "collector", ["collector"], TALLY_COLLECTOR=endpoint)
    low = free_ports(1)[0]
    agent = AgentProc(private, "hl", (low, low + 4), collector=endpoint)
    the_placer = placer(private, [])
    for d in (collector, agent, the_placer):
        d.start()
    try:
        with Ledger(private.dsn()) as ledger:
            create(ledger, "logged")
            release(ledger, private.root.parent, "logged", "hello", 1)

            def logged() -> str:
                out = tally(private, "logs", "-a", "logged", "-n", "50")
                return out.stdout if "Booting worker" in out.stdout else ""

            text = wait_until(logged, 90, "gunicorn's start-up lines in tally logs")
            assert "logged.1.web." in text
            follower = subprocess.Popen(
                [sys.executable, "-m", "tally.cli", "logs", "logged", "-f", "-n", "0"],
                env=tally_env(private), stdout=subprocess.PIPE, text=True)
            try:
                agent.kill()
                agent.kill_apps()  # gunicorn says nothing when killed: restart it instead
                agent.start()
                wait_until(lambda: "Booting worker" in (follower.stdout.readline() or ""), 60,
                           "a new line followed")
            finally:
                follower.terminate()
                follower.wait(10)
                follower.stdout.close()
        bad = tally(private, "logs", "../etc")
        assert bad.returncode == 1 and "not an app name" in bad.stderr
        assert "Traceback" not in bad.stderr
    finally:
        for d in (the_placer, agent, collector):
            d.kill()
        agent.kill_apps()
