"""A whole deploy as a developer sees it: `tally deploy` against a private platform (ledger,
relays, projectors, placer, one host agent, the API) follows the rollout until the
instance answers HTTP, then `tally ps` shows it; a crashing app is reported with why."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from ledger.cluster import Cluster
from tests.api_process import ApiProcess
from tests.conftest import RelayProcs, destroy_cluster, free_ports, make_cluster, tally_env
from tests.e2e.test_cli import Tally
from tests.fixtures.apps.fleet import AgentProc, Daemon, placer

APPS = Path(__file__).resolve().parents[1] / "fixtures" / "apps"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Tally, AgentProc]]:
    cluster: Cluster = make_cluster()
    relays = RelayProcs(cluster)
    relays.start(0)
    relays.start(1)
    env = {"TALLY_RELAYS": ",".join(relays.endpoints)}
    projectors = Daemon(cluster, "projectors", ["projectors", "--poll-interval", "0.2"], **env)
    place = placer(cluster, relays.endpoints)
    low = free_ports(1)[0]
    agent = AgentProc(cluster, "h1", (low, low + 9), relays.endpoints)
    api = ApiProcess(tally_env(cluster, **env), free_ports(1)[0])
    try:
        for daemon in (projectors, place, agent):
            daemon.start()
        api.wait_ready()
        creds = tmp_path_factory.mktemp("creds") / "credentials.json"
        tally = Tally(tally_env(cluster, TALLY_API=api.url, TALLY_CREDENTIALS=str(creds),
                                **env))
        token = tally("admin", "create-user", "dev", "--role", "admin").stdout.strip()
        tally("login", "--token", token)
        yield tally, agent
    finally:
        api.stop()
        for daemon in (agent, place, projectors):
            daemon.kill()
        agent.kill_apps()
        relays.stop()
        destroy_cluster(cluster)


def test_deploy_follows_the_rollout_until_healthy(platform: tuple[Tally, Any]) -> None:
    tally, _ = platform
    app = f"hello-{uuid.uuid4().hex[:6]}"
    tally("apps:create", app)
    # a cold machine builds the sample's virtualenv first (pip): minutes, once
    r = tally("deploy", "-a", app, str(APPS / "hello"), "--timeout", "240", timeout=300)
    assert "waiting for 1 instance(s) of v1 to be healthy" in r.stderr
    assert "v1 is deployed" in r.stderr, r.stderr
    rows = tally.json("ps", "-a", app)
    healthy = [x for x in rows if x["state"] == "healthy" and x["release"] == 1]
    assert len(healthy) == 1
    answer = requests.get(f"http://127.0.0.1:{healthy[0]['port']}/", timeout=5)
    assert answer.status_code == 200
    assert app in [a["name"] for a in tally.json("apps")]


def test_deploy_of_a_crashing_app_says_why(platform: tuple[Tally, Any]) -> None:
    tally, _ = platform
    app = f"crash-{uuid.uuid4().hex[:6]}"
    tally("apps:create", app)
    r = tally("deploy", "-a", app, str(APPS / "crasher"), "--timeout", "240", ok=False,
              timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "v1 failed to deploy" in r.stderr and "crash-looping" in r.stderr, r.stderr
    assert "instances: web" in r.stderr, "progress shown while following"
    # `tally ps` shows the crash loop too: restarts and the last exit code (3), even while
    # the instance is between restarts.
    assert "EXIT_CODE" in tally("ps", "-a", app).stdout
    (inst,) = json.loads(tally("ps", "-a", app, "--json").stdout)
    assert inst["exit_code"] == 3 and inst["restarts"] >= 3, inst
