"""The state commands as a user runs them: `tally why`, `state --at`, `diff`, `events`
(through the API, with an admin's token), `projectors status` (on the ledger host), and one
clear line (no traceback) for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from api.auth import create_user
from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from tests.api_process import ApiProcess
from tests.conftest import free_ports, tally_env
from tests.unit.test_why import History
from tests.waiting import Lines


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Iterator[dict[str, str]]:
    """The API, and the environment of a CLI that uses it with an admin's token."""
    proc = ApiProcess(tally_env(cluster), free_ports(1)[0])
    proc.wait_ready()
    with Ledger(cluster.dsn()) as ledger:
        token = create_user(ledger, f"root-{uuid.uuid4().hex[:6]}", "admin")
    yield tally_env(cluster, TALLY_API=proc.url, TALLY_TOKEN=token, TALLY_RELAYS="")
    proc.stop()


def tally(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tally.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def app(cluster: Cluster) -> tuple[str, int, int]:
    """A serving app; returns its name, the position before it existed, and the head."""
    history = History(f"e{uuid.uuid4().hex[:10]}").running(f"e{uuid.uuid4().hex[:6]}")
    with Ledger(cluster.dsn()) as ledger:
        before = ledger.sequence()
        for stream, event in history.appends:
            ledger.append(stream, [event])
        return history.app, before, ledger.sequence()


def test_why_explains_a_serving_app(api: dict[str, str], app: tuple[str, int, int]) -> None:
    name, _, _ = app
    out = tally(api, "why", name)
    assert out.returncode == 0, out.stderr
    assert f"{name} is serving" in out.stdout and f"{name}.tally.local ->" in out.stdout
    answer = json.loads(tally(api, "why", name, "--json").stdout)
    assert answer["serving"] and all(f["positions"] for f in answer["findings"])


def test_state_diff_and_events(api: dict[str, str], app: tuple[str, int, int]) -> None:
    name, before, head = app
    out = tally(api, "state", "--at", str(head), "--view", "apps", "--json")
    assert out.returncode == 0, out.stderr
    (row,) = [r for r in json.loads(out.stdout)["apps"] if r["name"] == name]
    assert row["current_release"] == 1 and row["scale"] == {"web": 1}
    table = tally(api, "state", "--at", str(head), "--view", "routes")
    assert f"{name}.tally.local" in table.stdout and "BACKENDS" in table.stdout
    changes = tally(api, "diff", str(before), str(head), "--view", "apps")
    assert changes.returncode == 0 and f'+ {{"name": "{name}"' in changes.stdout
    events = tally(api, "events", "--stream", f"app-{name}", "--json")
    types = [json.loads(line)["type"] for line in events.stdout.splitlines()]
    assert types == ["AppCreated", "ReleaseCreated", "ScaleChanged"]
    recent = tally(api, "events", "--since", "10m", "--type", "AppCreated")
    assert recent.returncode == 0 and f"name={name}" in recent.stdout
    status = tally(api, "projectors", "status")
    assert status.returncode == 0 and "routes" in status.stdout


@pytest.mark.parametrize("args, message", [
    (["state", "--at", "-1"], "invalid at"),
    (["state", "--at", str(10**12)], "beyond the ledger head"),
    (["state", "--at", "1", "--view", "nope"], "unknown view 'nope'"),
    (["diff", "1", str(10**12)], "beyond the ledger head"),
    (["events", "--type", "Nope"], "unknown event type 'Nope'"),
    (["events", "--category", "nope"], "unknown category 'nope'"),
    (["events", "--since", "yesterday"], "--since 'yesterday'"),
    (["events", "--since", "99999999d"], "--since '99999999d'"),
    (["events", "--since", "9999999999d"], "--since '9999999999d'"),
    (["why", "Bad!"], "is not an app name"),
    (["projectors", "rebuild", "nope"], "unknown projector 'nope'"),
])
def test_bad_input_gets_one_clear_line(api: dict[str, str], args: list[str],
                                       message: str) -> None:
    out = tally(api, *args)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], out.stderr


def test_events_follow_prints_new_events_as_they_come(cluster: Cluster,
                                                      api: dict[str, str]) -> None:
    stream = f"heartbeat-f{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tally.cli", "events", "--follow", "--json", "--stream", stream],
        env=api, stdout=subprocess.PIPE, text=True)
    try:
        with Ledger(cluster.dsn()) as ledger:
            ledger.append(stream, [NewEvent("HostHeartbeat", {"host_id": "f", "instances": 7})])
            ledger.sequence()
        line = Lines(proc.stdout).next(30, "the follower printed the new event")
        assert json.loads(line)["data"]["instances"] == 7
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_events_redact_config_values_unless_asked(cluster: Cluster,
                                                  api: dict[str, str]) -> None:
    name = f"s{uuid.uuid4().hex[:10]}"
    with Ledger(cluster.dsn()) as ledger:
        ledger.append(f"app-{name}", [
            NewEvent("AppCreated", {"name": name, "owner": "ann"}),
            NewEvent("ConfigChanged", {"app": name, "set": {"DB_PASSWORD": "hunter2"},
                                       "config_version": 1})])
        ledger.sequence()
    shown = tally(api, "events", "--stream", f"app-{name}")
    assert "DB_PASSWORD" in shown.stdout and "hunter2" not in shown.stdout
    asked = tally(api, "events", "--stream", f"app-{name}", "--json", "--show-secrets")
    assert "hunter2" in asked.stdout
