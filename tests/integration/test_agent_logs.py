"""Logs end to end: an instance's output travels from its host agent over ZeroMQ PUSH to
`tally serve collector`, into the app's chunked files, and out of `tally logs [-f]` (through
the API, as from a developer's machine)."""

from __future__ import annotations

import os
import subprocess
import sys

from api.auth import create_user
from ledger import Ledger
from ledger.cluster import Cluster
from tests.api_process import ApiProcess
from tests.conftest import free_port_range, free_ports, tally_env
from tests.fixtures.apps.fleet import AgentProc, Daemon, placer, release
from tests.fixtures.apps.fleet import create_app as create
from tests.waiting import Lines, wait_until


def tally(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tally.cli", *args], capture_output=True,
                          text=True, env=env, timeout=30)


def test_logs_reach_the_collector_and_tally_logs(private: Cluster) -> None:
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    collector = Daemon(private, "collector", ["collector"], TALLY_COLLECTOR=endpoint)
    low, _ = free_port_range(5)
    agent = AgentProc(private, "hl", (low, low + 4), collector=endpoint)
    the_placer = placer(private, [])
    api = ApiProcess(tally_env(private), free_ports(1)[0])
    for d in (collector, agent, the_placer):
        d.start()
    try:
        api.wait_ready()
        with Ledger(private.dsn()) as ledger:
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("TALLY_")},
                   "TALLY_API": api.url, "TALLY_TOKEN": create_user(ledger, "root", "admin")}
            create(ledger, "logged")
            release(ledger, private.root.parent, "logged", "hello", 1)

            def logged() -> str:
                out = tally(env, "logs", "-a", "logged", "-n", "50")
                return out.stdout if "Booting worker" in out.stdout else ""

            text = wait_until(logged, 90, "gunicorn's start-up lines in tally logs")
            assert "logged.1.web." in text
            follower = subprocess.Popen(
                [sys.executable, "-m", "tally.cli", "logs", "logged", "-f", "-n", "0"],
                env=env, stdout=subprocess.PIPE, text=True)
            try:
                agent.kill()
                agent.kill_apps()  # gunicorn says nothing when killed: restart it instead
                agent.start()
                Lines(follower.stdout).until(lambda line: "Booting worker" in line, 60,
                                             "a new line followed")
            finally:
                follower.terminate()
                follower.wait(10)
                follower.stdout.close()
        bad = tally(env, "logs", "../etc")
        assert bad.returncode == 1 and "not an app name" in bad.stderr
        assert "Traceback" not in bad.stderr
    finally:
        api.stop()
        for d in (the_placer, agent, collector):
            d.kill()
        agent.kill_apps()
