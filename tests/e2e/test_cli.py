"""The `tally` CLI driven as a developer drives it: subprocesses against a real API (gunicorn
on a free port) over the session's ledger."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api_process import ApiProcess
from tests.conftest import free_ports, tally_env

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "bundles" / "hello"


class Tally:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __call__(self, *args: str, ok: bool = True,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "tally.cli", *args], env=self.env,
                           capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if ok:
            assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)


@pytest.fixture(scope="module")
def api(cluster: Any) -> Iterator[ApiProcess]:
    proc = ApiProcess(tally_env(cluster), free_ports(1)[0])
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def tally(cluster: Any, api: ApiProcess, tmp_path_factory: pytest.TempPathFactory) -> Tally:
    creds = tmp_path_factory.mktemp("creds") / "credentials.json"
    env = tally_env(cluster, TALLY_API=api.url, TALLY_CREDENTIALS=str(creds))
    env.pop("TALLY_TOKEN", None)
    t = Tally(env)
    token = t("admin", "create-user", f"dev-{uuid.uuid4().hex[:6]}", "--role", "admin")
    t("login", "--token", token.stdout.strip())
    return t


def test_create_deploy_scale_config_rollback(tally: Tally) -> None:
    app = f"hello-{uuid.uuid4().hex[:6]}"
    r = tally("apps:create", app)
    assert r.stdout == "", "quiet on success: what changed is said on stderr"
    assert r.stderr.startswith(f"Creating {app}... done")
    assert tally.json("apps:info", app)["owner"].startswith("dev-")
    r = tally("deploy", "-a", app, str(SAMPLE), "--no-wait", "-m", "first")
    assert "release v1 created" in r.stderr
    assert r.stdout == f"{app} answers at {tally.json('apps:info', app)['web_url']}\n"
    info = tally.json("apps:info", app)
    assert info["release"] == 1 and info["scale"] == {"web": 1}
    r = tally("scale", "-a", app, "web=2", "worker=1")
    assert r.stderr == f"Scaling {app}: web=2 worker=1... done, now web=2 worker=1\n"
    assert tally.json("apps:info", app)["scale"] == {"web": 2, "worker": 1}
    r = tally("config:set", "-a", app, "GREETING=hi there", "DEBUG=0")
    assert r.stderr == f"Setting GREETING, DEBUG and restarting {app}... done, v2\n"
    assert tally.json("config", "-a", app) == {"GREETING": "hi there", "DEBUG": "0"}
    assert tally("config", "-a", app).stdout.splitlines() == ["DEBUG=0", "GREETING=hi there"]
    r = tally("config:unset", "-a", app, "DEBUG")
    assert r.stderr == f"Unsetting DEBUG and restarting {app}... done, v3\n"
    releases = tally.json("releases", "-a", app)
    assert [r["number"] for r in releases] == [3, 2, 1]
    r = tally("rollback", "-a", app, "v1")
    assert "rolled back to v1 as v4" in r.stderr
    assert tally.json("config", "-a", app) == {}
    assert "v4" in tally("releases", "-a", app).stdout
    tally("domains:add", "-a", app, f"www.{app}.example.com")
    assert tally.json("domains", "-a", app) == [f"www.{app}.example.com"]
    r = tally("maintenance:on", "-a", app)
    assert r.stderr == f"Enabling maintenance mode for {app}... done\n"
    assert tally.json("apps:info", app)["maintenance"] is True
    tally("maintenance:off", "-a", app)
    assert tally.json("ps", "-a", app) == []
    quiet = tally("stats", "-a", app)
    assert quiet.stdout == "" and "no samples" in quiet.stderr
    assert tally.json("stats", "-a", app, "--minutes", "5")["requests"] == 0


def test_stats_show_each_instance_and_the_traffic(tally: Tally, cluster: Any) -> None:
    import psycopg2

    app = f"stat-{uuid.uuid4().hex[:6]}"
    tally("apps:create", app)
    with psycopg2.connect(cluster.dsn("tally_owner")) as conn, conn.cursor() as cur:
        for ago, requests in ((120, 10), (60, 30), (0, 2)):
            cur.execute("INSERT INTO stats.instance_samples (at, app, instance_id, host_id, "
                        "requests, memory_bytes, cpu_seconds) VALUES (now() - make_interval("
                        "secs => %s), %s, %s, 'h1', %s, %s, %s)",
                        (ago, app, f"{app}.1.web.x", requests, 64 * 2**20, 1.0))
    conn.close()
    lines = tally("stats", "-a", app).stdout.splitlines()
    assert lines[0].split()[:3] == ["INSTANCE_ID", "HOST_ID", "REQUESTS"]
    assert lines[1].split()[:4] == [f"{app}.1.web.x", "h1", "42", "64"]
    assert lines[-1].startswith("42 requests in 60 min (0.7/min)") and "█" in lines[-1]
    r = tally("stats", "-a", app, "--minutes", "0", ok=False)
    assert r.returncode == 1 and "minutes" in r.stderr and "Traceback" not in r.stderr


def test_deploy_follows_rollout_and_says_what_it_waits_for(tally: Tally) -> None:
    app = f"wait-{uuid.uuid4().hex[:6]}"
    tally("apps:create", app)
    r = tally("deploy", "-a", app, str(SAMPLE), "--timeout", "1", ok=False)
    assert r.returncode == 1  # no builder runs beside this API: it says so within --timeout
    assert "waiting for a builder (`tally serve builder`) to take the build" in r.stderr
    assert "the build of v1 is still pending after 1s (is a builder running?)" in r.stderr
    assert "Traceback" not in r.stderr


def test_deploy_with_a_bad_static_json_says_why_before_any_build(tally: Tally,
                                                                  tmp_path: Path) -> None:
    app = f"stat-{uuid.uuid4().hex[:6]}"
    tally("apps:create", app)
    (tmp_path / "Procfile").write_text("web: python app.py\n")
    (tmp_path / "requirements.txt").write_text("")
    (tmp_path / "static.json").write_text('{"static": "static"}')
    r = tally("deploy", "-a", app, str(tmp_path), "--timeout", "1", ok=False)
    assert r.returncode == 1 and "static.json" in r.stderr, r.stderr
    assert "prefixes start and end with /" in r.stderr and "Traceback" not in r.stderr
    assert "waiting for a builder" not in r.stderr  # refused at upload: no build queued


@pytest.mark.parametrize("args, reason", [
    (("apps:create", "Bad_Name"), "is not an app name"),
    (("scale", "-a", "no-such-app", "web=1"), "no app named"),
    (("scale", "-a", "no-such-app", "web=x"), "whole number"),
    (("config:set", "-a", "no-such-app", "novalue"), "KEY=VALUE"),
    (("rollback", "-a", "no-such-app", "vX"), "not a release"),
    (("deploy", "-a", "no-such-app", "/"), "no Procfile"),
    (("apps:delete", "no-such-app"), "--confirm"),
    (("access:remove", "-a", "no-such-app", "bob"), "no app named"),
    (("stats", "-a", "no-such-app"), "no app named"),
])
def test_failures_are_one_line_and_non_zero(tally: Tally, args: tuple[str, ...],
                                            reason: str) -> None:
    r = tally(*args, ok=False)
    assert r.returncode != 0 and reason in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_unreachable_api_and_no_login(tally: Tally, tmp_path: Path) -> None:
    r = tally("apps", "--api", f"http://127.0.0.1:{free_ports(1)[0]}", ok=False)
    assert r.returncode == 1 and "cannot reach the tally API" in r.stderr
    other = Tally({**tally.env, "TALLY_CREDENTIALS": str(tmp_path / "none.json")})
    r = other("apps", ok=False)
    assert r.returncode == 1 and "tally login" in r.stderr
    r = other("login", "--token", "tly_wrong", ok=False)
    assert r.returncode == 1 and "unknown or revoked" in r.stderr


def test_something_else_answering_is_one_line(tally: Tally, api: ApiProcess) -> None:
    r = tally("apps", "--api", api.url + "/openapi.json?x=", ok=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    r = tally("login", "--api", api.url + "/openapi.json?x=", "--token", "tly_x", ok=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("url", ["not-a-url", "ftp://127.0.0.1", "http://[::1"])
def test_a_malformed_api_url_is_one_line(tally: Tally, url: str) -> None:
    for args in (("apps", "--api", url), ("login", "--api", url, "--token", "tly_x")):
        r = tally(*args, ok=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "API" in r.stderr
