"""A whole deploy as a developer sees it: `tally deploy` against a private platform (ledger,
relays, projectors, placer, one host agent, the API) follows the rollout until the
instance answers HTTP, then `tally ps` shows it; a crashing app is reported with why; a
Celery `worker:` runs tasks through the app's Redis add-on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from ledger.cluster import Cluster
from tests.api_process import ApiProcess
from tests.conftest import (
    RelayProcs,
    destroy_cluster,
    free_port_range,
    free_ports,
    make_cluster,
    tally_env,
)
from tests.e2e.test_cli import Tally
from tests.fixtures.apps.fleet import AgentProc, Daemon, builder, placer
from tests.waiting import wait_until

APPS = Path(__file__).resolve().parents[1] / "fixtures" / "apps"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Tally, AgentProc]]:
    cluster: Cluster = make_cluster()
    relays = RelayProcs(cluster)
    relays.start(0)
    relays.start(1)
    redis_low, redis_high = free_port_range(4)  # the Redis add-ons' (API and agent agree)
    redis = {"TALLY_REDIS_PORTS": f"{redis_low}-{redis_high}"}
    env = {"TALLY_RELAYS": ",".join(relays.endpoints), **redis}
    projectors = Daemon(cluster, "projectors", ["projectors", "--poll-interval", "0.2"], **env)
    place = placer(cluster, relays.endpoints)
    build = builder(cluster)
    low, _ = free_port_range(10)
    agent = AgentProc(cluster, "h1", (low, low + 9), relays.endpoints, env=redis)
    api = ApiProcess(tally_env(cluster, **env), free_ports(1)[0])
    try:
        for daemon in (projectors, place, build, agent):
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
        for daemon in (agent, build, place, projectors):
            daemon.kill()
        agent.kill_apps()
        from agents import redisaddon

        redisaddon.stop_all(cluster.root.parent / "redis")
        relays.stop()
        for log in cluster.root.parent.glob("*.log"):  # for a look after a failure
            (tmp_path_factory.getbasetemp() / log.name).write_bytes(log.read_bytes())
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


@pytest.mark.parametrize(("sample", "expected"), [
    ("flaskr", {"app": "flaskr", "posts": 1, "home": "/app",
                "instance_path": "/app/instance"}),
    ("djangoapp", {"app": "django", "static_collected": True}),
    ("pyproj", {"app": "pyproj"}),
    ("editable", {"app": "editable", "greeting": "from-procfile", "cwd": "/app/web"}),
    ("postcompile", {"app": "postcompile", "built_with": "3.1.3"}),
])
def test_apps_as_people_write_them_deploy_unchanged_and_answer_200(
        platform: tuple[Tally, Any], sample: str, expected: dict[str, Any]) -> None:
    """Modelled on real apps: Flask's tutorial (writes its instance folder at start), a
    stock Django project (collectstatic at build, `release: migrate && check`), an app with
    only a pyproject.toml, a requirements.txt saying `-e .` with a Procfile saying
    `cd web && VAR=x gunicorn ...`, and bin/post_compile."""
    tally, _ = platform
    app = f"{sample[:10]}-{uuid.uuid4().hex[:6]}"
    tally("apps:create", app)
    r = tally("deploy", "-a", app, str(APPS / sample), "--timeout", "240", timeout=600)
    assert "v1 is deployed" in r.stderr, r.stderr
    assert "-----> Build succeeded" in r.stderr, "the build's output is shown as it comes"
    (row,) = [x for x in tally.json("ps", "-a", app) if x["state"] == "healthy"]
    answer = requests.get(f"http://127.0.0.1:{row['port']}/", timeout=5)
    assert answer.status_code == 200
    assert expected.items() <= answer.json().items(), answer.json()
    (build,) = tally.json("builds", "-a", app)
    assert build["status"] == "succeeded" and build["size_bytes"] > 0


def test_a_missing_requirement_fails_the_build_once_and_nothing_is_placed(
        platform: tuple[Tally, Any]) -> None:
    tally, _ = platform
    app = f"missing-{uuid.uuid4().hex[:6]}"
    tally("apps:create", app)
    r = tally("deploy", "-a", app, str(APPS / "missingreq"), ok=False, timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "this-package-does-not-exist-tally-11" in r.stderr, "pip's own error is shown"
    assert "v1 failed to build: pip install -r requirements.txt failed" in r.stderr, r.stderr
    (build,) = tally.json("builds", "-a", app)
    assert (build["status"], build["attempt"]) == ("failed", 1)
    assert tally.json("ps", "-a", app) == []
    output = tally("builds:output", "-a", app, "v1").stdout
    assert "No matching distribution found" in output
    releases = wait_until(lambda: [r for r in tally.json("releases", "-a", app)
                                   if r["status"] == "failed"], 30, "v1 shown as failed")
    assert "build failed" in releases[0]["failure_reason"]
    why = tally("why", app, ok=False).stdout
    assert "build failed" in why and "No matching distribution" in why, why


def test_config_set_after_a_failed_build_builds_on_the_deployed_release(
        platform: tuple[Tally, Any]) -> None:
    """config:set (and rollback) never build on a failed release: the new release runs the
    deployed code, at once (its slug is reused)."""
    tally, _ = platform
    app = f"recover-{uuid.uuid4().hex[:6]}"
    tally("apps:create", app)
    tally("deploy", "-a", app, str(APPS / "hello"), "--timeout", "240", timeout=600)
    tally("deploy", "-a", app, str(APPS / "missingreq"), ok=False, timeout=600)
    wait_until(lambda: any(r["status"] == "failed" for r in tally.json("releases", "-a", app)),
               30, "v2 failed")
    tally("config:set", "-a", app, "GREETING=again")
    v3 = tally.json("releases", "-a", app)[0]
    v1 = tally.json("releases", "-a", app)[-1]
    assert v3["number"] == 3 and v3["bundle_digest"] == v1["bundle_digest"]
    build = wait_until(lambda: [b for b in tally.json("builds", "-a", app)
                                if b["release"] == 3 and b["status"] == "succeeded"], 30,
                       "v3 built (reused)")
    assert build[0]["reused_from"] == 1


def test_a_failing_release_phase_prints_its_output_and_nothing_serves(
        platform: tuple[Tally, Any]) -> None:
    """As on Heroku: the release phase's output is shown, the deploy exits 1, and it says
    that nothing served before (so nothing serves now)."""
    tally, _ = platform
    app = f"migfail-{uuid.uuid4().hex[:6]}"
    tally("apps:create", app)
    tally("config:set", "-a", app, "FAIL_RELEASE=1")
    r = tally("deploy", "-a", app, str(APPS / "migrating"), "--timeout", "240", ok=False,
              timeout=300)
    assert r.returncode == 1, r.stderr
    assert "-----> Release phase of v" in r.stderr, r.stderr
    assert "       migrating the schema\n" in r.stderr, r.stderr
    assert "       migration failed: table already exists\n" in r.stderr
    assert "nothing of the app was serving before" in r.stderr


CELERY_CLIENT = """
import json, sys
from celery import Celery
url, task, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = Celery(broker=url, backend=url)
print(json.dumps(client.send_task(task, args).get(timeout=120)))
"""


def test_a_deployed_celery_worker_runs_tasks_through_its_redis_addon(
        platform: tuple[Tally, Any]) -> None:
    """A `worker:` process type from a slug the builder built, run by the host agent as the
    app's user, takes its tasks from the app's Redis add-on (REDIS_URL, broker and result
    backend) and reaches no other app's Redis, though a member points a *_URL at it."""
    tally, _ = platform
    app, other = f"celery-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    for name in (app, other):
        tally("apps:create", name)
        tally("addons:create", "-a", name, "redis")
    url = tally.json("config", "-a", app)["REDIS_URL"]
    theirs = tally.json("config", "-a", other)["REDIS_URL"]
    tally("config:set", "-a", app, f"OTHER_REDIS_URL={theirs}")
    r = tally("deploy", "-a", app, str(APPS / "celeryworker"), "--timeout", "240", timeout=600)
    assert "-----> Build succeeded" in r.stderr, r.stderr
    tally("scale", "-a", app, "worker=1")

    def send(task: str, *args: Any) -> Any:  # as another process of the app would
        out = subprocess.run([sys.executable, "-c", CELERY_CLIENT, url, task, json.dumps(args)],
                             env={**os.environ, "PYTHONWARNINGS": "ignore"},
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, (out.stderr[-1000:], tally("ps", "-a", app).stdout,
                                     tally("logs", "-a", app, ok=False).stdout[-3000:])
        return json.loads(out.stdout)
    ran = send("tasks.where")
    (row,) = [x for x in tally.json("ps", "-a", app) if x["process_type"] == "worker"]
    assert ran["instance"] == row["instance_id"], (ran, row)
    assert ran["uid"] != 0 and ran["home"] == "/app", "the app's user, in its slug"
    assert ran["other_redis"] == "closed", "another app's Redis port is not this app's"
    assert send("tasks.add", 2, 3) == 5
