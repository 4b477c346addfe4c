"""What an agent token opens (its own host only: DESIGN.md "Trust boundaries"), the desired
state a host reads, batched heartbeats, and reports sent twice recorded once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg2

from api import Settings, create_app
from api.auth import create_user, issue_token
from ledger import NewEvent
from tests.integration.test_api import World, uid, world  # noqa: F401
from tests.waiting import wait_until


def _tx_ids(w: World, stream: str) -> list[int]:
    conn = psycopg2.connect(w.owner_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT tx_id::text::bigint FROM ledger.events WHERE stream = %s "
                        "ORDER BY version", (stream,))
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def test_an_agent_token_acts_for_its_own_host_only(world: World) -> None:  # noqa: F811
    """It cannot register a host id it was not issued for, speak for another host, read
    another host's placements or slugs, or append any app's events."""
    other = f"other-{uid()}"
    app = world.new_app(releases=2)
    theirs = world.place(app, 2, host=other)
    register = {"address": "10.0.0.9", "port_min": 20000, "port_max": 20999, "capacity": 8}
    refused = [
        ("PUT", f"/hosts/{other}", register),
        ("POST", f"/hosts/{other}/heartbeats", {"load": 1.0}),
        ("GET", f"/hosts/{other}/placements", None),
        ("GET", f"/hosts/{other}/desired", None),
        ("POST", f"/hosts/{other}/stats", {"samples": []}),
        ("POST", f"/instances/{theirs}/events", {"type": "InstanceHealthy", "data": {}}),
        ("POST", f"/hosts/{world.host}/stats", {"samples": [
            {"app": app, "instance_id": theirs, "requests": 5}]}),
        ("GET", f"/apps/{app}/releases/2/bundle", None),  # placed on the other host only
        ("GET", f"/apps/{app}/releases/2/slug", None),  # refused before "not built yet"
        ("POST", f"/apps/{app}/scale", {"scale": {"web": 9}}),
        ("PATCH", f"/apps/{app}/config", {"set": {"EVIL": "1"}}),
        ("POST", f"/apps/{app}/rollback", {"release": 1}),
        ("PUT", f"/apps/{app}/maintenance", {"enabled": True}),
        ("DELETE", f"/apps/{app}", None),
        ("POST", "/users", {"name": f"u-{uid()}", "role": "admin"}),
    ]
    before = world.ledger.stream_version(f"app-{app}")
    for method, path, body in refused:
        r = world.call("agent", method, path, body)
        assert r.status_code == 403, (method, path, r.status_code, r.json)
    for stream in (f"host-{other}", f"heartbeat-{other}", f"instance-{theirs}"):
        assert world.ledger.read_stream(stream) == [], stream
    assert world.ledger.stream_version(f"app-{app}") == before


def test_a_host_reads_its_desired_state_and_nothing_of_others(world: World) -> None:  # noqa: F811
    app = world.new_app(releases=1)  # release 1 placed on the agent's host
    assert world.call("owner", "PATCH", f"/apps/{app}/config",
                      {"set": {"SECRET": "s3"}}).status_code == 200  # release 2, not placed
    other_app = world.new_app(releases=0)
    world.call("owner", "PATCH", f"/apps/{other_app}/config", {"set": {"THEIRS": "x"}})
    world.place(app, 1, host=f"other-{uid()}")

    r = world.call("agent", "GET", f"/hosts/{world.host}/desired")
    assert r.status_code == 200, r.json
    d = r.json
    mine = [p for p in d["placements"] if p["app"] == app]
    assert len(mine) == 1 and mine[0]["release"] == 1 and mine[0]["port"] == 20000
    release = world.call("owner", "GET", f"/apps/{app}/releases/1").json
    info = d["apps"][app]
    assert info["releases"]["1"]["digest"] == release["bundle_digest"]
    assert info["releases"]["1"]["procfile"]["web"] == "gunicorn app:app"
    # the config of the placed release (v0: none) and of the serving one (the current: v2)
    assert info["configs"] == {"0": {}, "1": {"SECRET": "s3"}}
    assert other_app not in d["apps"]
    assert "THEIRS" not in r.get_data(as_text=True)

    version = d["version"]
    again = world.call("agent", "GET", f"/hosts/{world.host}/desired?after={version}").json
    assert again["changed"] is False and again["placements"] == []
    beat = world.call("agent", "POST", f"/hosts/{world.host}/heartbeats", {"load": 0.1})
    assert beat.status_code == 202 and beat.json["desired"] == version

    world.ledger.append(f"placement-{app}", [NewEvent("InstanceUnplaced", {
        "instance_id": mine[0]["instance_id"], "app": app, "reason": "test"})])
    world.ledger.sequence()
    moved = world.call("agent", "GET", f"/hosts/{world.host}/desired?after={version}").json
    assert moved["changed"] is True and moved["version"] > version
    assert mine[0]["instance_id"] not in [p["instance_id"] for p in moved["placements"]]

    # apps with files on the host: whether they exist; no config of apps not placed here,
    # nor why their releases failed (a release phase's output is quoted in the reason)
    world.ledger.append(f"placement-{other_app}", [NewEvent("ReleaseFailed", {
        "app": other_app, "release": 1, "reason": "release phase: THEIRS-OUTPUT"})])
    world.ledger.sequence()
    asked = world.call("agent", "GET", f"/hosts/{world.host}/desired?apps={other_app}"
                                       f"&apps=gone-{uid()}")
    assert "THEIRS-OUTPUT" not in asked.get_data(as_text=True)
    asked = asked.json
    assert asked["apps"][other_app]["configs"] == {}
    assert asked["apps"][other_app]["addons"] == []
    assert set(asked["apps"]) - {p["app"] for p in asked["placements"]} == {other_app}


def test_heartbeats_are_answered_at_once_and_appended_together(
        world: World, cluster: Any, tmp_path: Path) -> None:  # noqa: F811
    """With a batch interval of 1 s, 40 heartbeats sent within it take far fewer than 40
    appends (each one its own transaction before), and all of them are recorded, in order."""
    host = f"hb-{uid()}"
    token = create_user(world.ledger, f"agent-{host}", "agent", host)
    client = create_app(Settings(cluster.dsn(), tmp_path, heartbeat_batch_s=1.0)).test_client()
    headers = {"Authorization": f"Bearer {token}"}
    for i in range(40):
        r = client.post(f"/hosts/{host}/heartbeats", json={"load": i}, headers=headers)
        assert r.status_code == 202, r.json
    stream = f"heartbeat-{host}"
    loads = [float(i) for i in range(40)]
    beats = wait_until(lambda: (b := world.ledger.read_stream(stream)) and
                       [e.data["load"] for e in b] == loads and b, 60,
                       "40 heartbeats, in order")
    assert beats[-1].metadata["actor"] == f"agent-{host}"
    transactions = set(_tx_ids(world, stream))
    assert len(transactions) < 40 // 2, f"{len(transactions)} appends for 40 heartbeats"


def test_a_revoked_tokens_heartbeats_are_not_recorded(
        world: World, cluster: Any, tmp_path: Path) -> None:  # noqa: F811
    """Heartbeats skip the per-request read of the caller's stream: their batch checks. An
    API process whose directory is minutes old still answers a revoked agent token's
    heartbeat 202 after the revocation's 204 (sent by another process), but the heartbeat
    never reaches the ledger; the same host's new token's does."""
    host = f"hb-{uid()}"
    token = create_user(world.ledger, f"agent-{host}", "agent", host)
    app = create_app(Settings(cluster.dsn(), tmp_path, auth_refresh_s=600.0,
                              heartbeat_batch_s=0.05))
    client, svc = app.test_client(), app.extensions["tally"]

    def beat(tok: str, load: float) -> int:
        return client.post(f"/hosts/{host}/heartbeats", json={"load": load},
                           headers={"Authorization": f"Bearer {tok}"}).status_code

    assert beat(token, 1) == 202
    assert svc.heartbeats.wait_flushed(60)  # a thread appends: slow under load
    token_id = svc.directory().lookup(token).token_id
    r = world.call("admin", "DELETE", f"/users/agent-{host}/tokens/{token_id}")
    assert r.status_code == 204, r.json
    assert beat(token, 2) == 202, "this process has not refreshed its directory yet"
    fresh = issue_token(world.ledger, f"agent-{host}")
    assert beat(fresh, 3) == 202  # an unknown token refreshes the directory
    assert beat(token, 4) == 401  # which now knows of the revocation too
    assert svc.heartbeats.wait_flushed(60)  # a thread appends: slow under load
    assert [e.data["load"] for e in world.ledger.read_stream(f"heartbeat-{host}")] == [1.0, 3.0]
    assert svc.heartbeats.counts.revoked == 1


def test_a_heartbeats_body_is_checked_as_its_schema_says(world: World) -> None:  # noqa: F811
    """Plain heartbeats are answered before Flask (api/beats.py), the rest by the route and
    its schema: the same answers either way."""
    for bad in ({"load": -1}, {"load": "high"}, {"load": True}, {"instances": "many"},
                {"instances": 1 << 21}, {"memory_used_mb": None}, {"colour": 1}, [1],
                {"load": float("nan")}):
        r = world.call("agent", "POST", f"/hosts/{world.host}/heartbeats", bad)
        assert r.status_code == 422 and r.json["fields"], (bad, r.status_code, r.json)
    path = world.client.application.wsgi_app
    before = path.answered
    for good in ({"load": 2, "instances": 3}, {"load": "0.25"}, {"instances": 4.5}, {}):
        r = world.call("agent", "POST", f"/hosts/{world.host}/heartbeats", good)
        assert r.status_code == 202, (good, r.json)
        assert set(r.json) == {"accepted", "desired"}
    assert path.answered - before == 2, "the plain ones before Flask, the others by the route"
    r = world.call("admin", "POST", f"/hosts/{world.host}/heartbeats", {"load": 1})
    assert r.status_code == 202 and path.answered - before == 2  # admins: the route
    fast = world.call("agent", "POST", f"/hosts/{world.host}/heartbeats", {"load": 1})
    assert path.answered - before == 3
    assert fast.data == r.data and fast.content_type == r.content_type  # the same bytes
    assert world.client.application.extensions["tally"].heartbeats.wait_flushed(60)
    last = [e.data for e in world.ledger.read_stream(f"heartbeat-{world.host}")][-4:]
    assert [(d["load"], d["instances"]) for d in last] == [(0.0, 4), (0.0, 0), (1.0, 0),
                                                           (1.0, 0)]
    assert all(type(d["load"]) is float for d in last)


def test_a_report_sent_again_with_its_key_is_recorded_once(world: World) -> None:  # noqa: F811
    app = world.new_app(releases=1)
    iid = world.place(app, 1)
    report = {"type": "InstanceStarted", "data": {"pid": 4242}, "key": f"k-{uid()}-0001"}
    for _ in range(3):  # e.g. the answer was lost and the agent sent it again
        r = world.call("agent", "POST", f"/instances/{iid}/events", report)
        assert r.status_code == 200, r.json
    assert [e.type for e in world.ledger.read_stream(f"instance-{iid}")] == ["InstanceStarted"]
