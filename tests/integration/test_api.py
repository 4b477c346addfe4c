"""The API against the session's real ledger, through Flask's test client: every endpoint's
happy path and bad inputs, the permission matrix, concurrent writes."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from api import Settings, create_app
from api.auth import create_user
from ledger import Ledger, NewEvent
from tests.api_process import pack_files, project_now
from tests.conftest import session_uids
from tests.waiting import wait_until

BUNDLE = {"Procfile": "web: gunicorn app:app\nworker: python worker.py\n",
          "requirements.txt": "flask\n", "app.py": "app = None\n"}


def uid() -> str:
    return uuid.uuid4().hex[:8]


@dataclass
class World:
    client: Any
    ledger: Ledger
    owner_dsn: str
    tokens: dict[str, str]
    names: dict[str, str]
    host: str
    applogs: Path

    def call(self, who: str | None, method: str, path: str, json: Any = None,
             data: bytes | None = None, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        if data is not None:
            headers["Content-Type"] = "application/gzip"
            return self.client.open(path, method=method, data=data, headers=headers, **kw)
        return self.client.open(path, method=method, json=json, headers=headers, **kw)

    def new_app(self, releases: int = 2) -> str:
        """An app owned by `owner` with releases, a domain, release 1 placed on the agent's
        host."""
        name = f"app-{uid()}"
        assert self.call("owner", "POST", "/apps", {"name": name}).status_code == 201
        for n in range(releases):
            files = {**BUNDLE, "app.py": f"app = {n}\n"}
            r = self.call("owner", "POST", f"/apps/{name}/releases", data=pack_files(files))
            assert r.status_code == 201, r.json
        r = self.call("owner", "POST", f"/apps/{name}/domains", {"domain": f"{name}.example.com"})
        assert r.status_code == 201, r.json
        if releases:
            self.place(name, 1)
        return name

    def place(self, app: str, release: int, host: str | None = None) -> str:
        """Place an instance on the agent's host (standing in for the placer), and project;
        returns the instance id."""
        iid = uid()
        self.ledger.append(f"placement-{app}", [NewEvent("InstancePlaced", {
            "instance_id": iid, "app": app, "release": release, "process_type": "web",
            "host_id": host or self.host, "port": 20000})])
        project_now(self.owner_dsn)
        return iid


@pytest.fixture(scope="module")
def world(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from agents import logs

    applogs = tmp_path_factory.mktemp("applogs")
    settings = Settings(cluster.dsn(), tmp_path_factory.mktemp("bundles"),
                        max_bundle_bytes=256 * 1024, auth_refresh_s=0.0, long_poll_max_s=2.0,
                        hosts_fresh_s=0.0, app_uids=session_uids(),
                        logs_tail=lambda app, n: logs.tail(applogs, app, n))
    app = create_app(settings)
    host = f"h-{uid()}"
    with Ledger(cluster.dsn()) as ledger:
        names = {"admin": f"admin-{uid()}", "owner": f"alice-{uid()}",
                 "other": f"bob-{uid()}", "agent": f"agent-{uid()}",
                 "builder": f"builder-{uid()}", "balancer": f"balancer-{uid()}"}
        roles = {"admin": ("admin", None), "agent": ("agent", host),
                 "builder": ("builder", f"b-{host}"), "balancer": ("balancer", f"lb-{host}")}
        tokens = {who: create_user(ledger, name, *roles.get(who, ("member", None)))
                  for who, name in names.items()}
        yield World(app.test_client(), ledger, cluster.dsn("tally_owner"), tokens, names,
                    host, applogs)


# --- happy paths -------------------------------------------------------------------------


def test_create_show_list_delete(world: World) -> None:
    name = f"blog-{uid()}"
    r = world.call("owner", "POST", "/apps", {"name": name})
    assert r.status_code == 201
    assert r.json["owner"] == world.names["owner"] and r.json["release"] is None
    shown = world.call("owner", "GET", f"/apps/{name}").json
    assert shown["name"] == name and shown["scale"] == {}
    assert world.call("owner", "POST", "/apps", {"name": name}).status_code == 409
    assert world.call("owner", "DELETE", f"/apps/{name}").status_code == 204
    assert world.call("owner", "GET", f"/apps/{name}").status_code == 404
    events = world.ledger.read_stream(f"app-{name}")
    assert [e.type for e in events] == ["AppCreated", "AppDeleted"]
    assert all(e.metadata["actor"] == world.names["owner"] for e in events)


def test_a_deleted_apps_name_is_not_taken_by_someone_else(world: World) -> None:
    """Its history stays in the stream: another owner of the name would read the old
    config values through /events?show_secrets=true."""
    name = f"gone-{uid()}"
    assert world.call("owner", "POST", "/apps", {"name": name}).status_code == 201
    world.call("owner", "PATCH", f"/apps/{name}/config", {"set": {"TOKEN": "hunter2"}})
    assert world.call("owner", "DELETE", f"/apps/{name}").status_code == 204
    r = world.call("other", "POST", "/apps", {"name": name})
    assert r.status_code == 409, r.json
    assert world.call("other", "GET", f"/apps/{name}/events?show_secrets=true"
                      ).status_code in (403, 404)
    assert world.call("owner", "POST", "/apps", {"name": name}).status_code == 201


def test_first_release_scales_web_and_bundle_downloads(world: World) -> None:
    name = world.new_app(releases=1)
    app = world.call("owner", "GET", f"/apps/{name}").json
    assert app["release"] == 1 and app["scale"] == {"web": 1}
    assert app["process_types"] == ["web", "worker"]
    rel = world.call("owner", "GET", f"/apps/{name}/releases/1").json
    assert rel["procfile"]["web"] == "gunicorn app:app"
    r = world.call("agent", "GET", f"/apps/{name}/releases/1/bundle")
    assert r.status_code == 200 and r.data[:2] == b"\x1f\x8b"
    r.close()
    import hashlib
    assert hashlib.sha256(r.data).hexdigest() == rel["bundle_digest"]


def test_scale_config_rollback(world: World) -> None:
    name = world.new_app(releases=2)
    r = world.call("owner", "POST", f"/apps/{name}/scale", {"scale": {"web": 2, "worker": 1}})
    assert r.status_code == 200 and r.json["scale"] == {"web": 2, "worker": 1}
    r = world.call("owner", "PATCH", f"/apps/{name}/config", {"set": {"SECRET": "s3cret"}})
    assert r.status_code == 200 and r.json["config"] == {"SECRET": "s3cret"}
    releases = world.call("owner", "GET", f"/apps/{name}/releases").json["releases"]
    assert [x["number"] for x in releases] == [3, 2, 1]
    assert releases[0]["config_version"] == 1 and "set SECRET" in releases[0]["description"]
    r = world.call("owner", "POST", f"/apps/{name}/rollback", {"release": 1})
    assert r.status_code == 201, r.json
    assert r.json["number"] == 4 and r.json["rollback_of"] == 1
    assert r.json["bundle_digest"] == releases[-1]["bundle_digest"]
    assert world.call("owner", "GET", f"/apps/{name}/config").json["config"] == {}
    r = world.call("owner", "PATCH", f"/apps/{name}/config", {"unset": ["NOPE"]})
    assert r.status_code == 200


def test_config_values_redacted_in_events_unless_asked(world: World) -> None:
    name = world.new_app(releases=0)
    world.call("owner", "PATCH", f"/apps/{name}/config", {"set": {"DB_PASSWORD": "hunter2"}})
    world.ledger.sequence()
    body = world.call("owner", "GET", f"/apps/{name}/events").json
    changed = [e for e in body["events"] if e["type"] == "ConfigChanged"]
    assert changed and changed[0]["data"]["set"] == {"DB_PASSWORD": "<redacted>"}
    assert "hunter2" not in str(body)
    shown = world.call("owner", "GET", f"/apps/{name}/events?show_secrets=true").json
    assert "hunter2" in str(shown)
    assert world.call("other", "GET", f"/apps/{name}/events").status_code == 403


def test_events_after_filters_and_long_poll(world: World) -> None:
    name = world.new_app(releases=0)
    head = world.ledger.sequence()
    r = world.call("admin", "GET", f"/events?after={head}&wait=0.3")
    assert r.status_code == 200 and r.json["events"] == []
    world.call("owner", "POST", f"/apps/{name}/maintenance", {"enabled": True})
    world.call("owner", "PUT", f"/apps/{name}/maintenance", {"enabled": True})
    r = world.call("admin", "GET", f"/events?after={head}&type=MaintenanceChanged&wait=2")
    assert [e["data"]["app"] for e in r.json["events"]] == [name]
    assert r.json["head"] >= r.json["events"][0]["position"]


def test_a_long_poll_never_walks_the_whole_history(world: World,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan cut short by its page budget answers at once with where to go on from,
    instead of scanning on, page budget after page budget, for the whole wait."""
    from api import routes_history

    monkeypatch.setattr(routes_history, "PAGE", 1)
    monkeypatch.setattr(routes_history, "SCAN_PAGES", 1)
    name = world.new_app(releases=0)
    after = world.ledger.sequence()
    for _ in range(3):
        world.new_app(releases=0)
    head = world.ledger.sequence()
    r = world.call("owner", "GET", f"/apps/{name}/events?after={after}&wait=1.5")
    assert r.status_code == 200 and r.json["events"] == []
    assert after < r.json["head"] < head, "one page scanned, then answered"


def test_long_polls_may_hold_only_their_slots(world: World, cluster: Any,
                                              tmp_path: Path) -> None:
    """Each long-poll holds a worker thread: past `long_poll_slots` waiting at once, event
    reads answer at once, so a few clients cannot take every thread for 30 s."""
    client = create_app(Settings(cluster.dsn(), tmp_path, long_poll_slots=1,
                                 long_poll_max_s=3.0)).test_client()
    auth = {"Authorization": f"Bearer {world.tokens['admin']}"}
    url = f"/events?after={world.ledger.sequence()}&type=BackupPruned&wait=2.5"
    took: list[float] = []

    def poll() -> None:
        began = time.monotonic()
        assert client.get(url, headers=auth).status_code == 200
        took.append(time.monotonic() - began)
    first = threading.Thread(target=poll)
    first.start()
    time.sleep(0.5)
    poll()
    first.join()
    assert took[0] < 1.5 <= 2.0 <= took[1], took


def test_domains_unique_across_apps(world: World) -> None:
    a, b = world.new_app(releases=0), world.new_app(releases=0)
    r = world.call("owner", "POST", f"/apps/{b}/domains", {"domain": f"{a}.example.com"})
    assert r.status_code == 409
    assert world.call("owner", "POST", f"/apps/{a}/domains",
                      {"domain": f"*.{a}.Example.com."}).status_code == 201
    assert world.call("owner", "GET", f"/apps/{a}/domains").json["domains"] == [
        f"{a}.example.com", f"*.{a}.example.com"]
    r = world.call("owner", "DELETE", f"/apps/{a}/domains/{a}.example.com")
    assert r.status_code == 200
    r = world.call("owner", "POST", f"/apps/{b}/domains", {"domain": f"{a}.example.com"})
    assert r.status_code == 201
    world.call("owner", "DELETE", f"/apps/{b}")
    r = world.call("owner", "POST", f"/apps/{a}/domains", {"domain": f"{a}.example.com"})
    assert r.status_code == 201, "deleting an app frees its domains"


def test_deleting_frees_a_domain_another_worker_just_added(world: World, cluster: Any,
                                                           tmp_path: Path) -> None:
    """The worker deleting may hold an older fold of the app (reads answer from it): the
    claims it frees are those of the state the deletion was decided on."""
    stale = create_app(Settings(cluster.dsn(), tmp_path, read_fresh_s=60.0)).test_client()
    auth = {"Authorization": f"Bearer {world.tokens['owner']}"}
    name, other = world.new_app(releases=0), world.new_app(releases=0)
    assert stale.get(f"/apps/{name}", headers=auth).status_code == 200
    domain = f"late-{uid()}.example.com"
    assert world.call("owner", "POST", f"/apps/{name}/domains",
                      {"domain": domain}).status_code == 201
    assert stale.delete(f"/apps/{name}", headers=auth).status_code == 204
    r = world.call("owner", "POST", f"/apps/{other}/domains", {"domain": domain})
    assert r.status_code == 201, r.json


def test_a_claim_left_by_a_dead_request_is_the_apps_to_use(world: World) -> None:
    """A request that claimed the name and died before DomainAdded: the app may add it."""
    from api.decide import domain_stream

    name = world.new_app(releases=0)
    domain = f"half-{uid()}.example.com"
    world.ledger.append(domain_stream(domain), [NewEvent("DomainClaimed", {
        "domain": domain, "app": name})])
    r = world.call("owner", "POST", f"/apps/{name}/domains", {"domain": domain})
    assert r.status_code == 201, r.json
    r = world.call("owner", "POST", f"/apps/{name}/domains", {"domain": domain})
    assert r.status_code == 409
    other = world.new_app(releases=0)
    r = world.call("owner", "POST", f"/apps/{other}/domains", {"domain": domain})
    assert r.status_code == 409, "the claim is still held"


def test_members_see_only_their_apps(world: World) -> None:
    name = world.new_app(releases=0)
    listed = lambda who: [a["name"] for a in world.call(who, "GET", "/apps").json["apps"]]  # noqa: E731
    project_now(world.owner_dsn)
    assert name in listed("owner") and name in listed("admin")
    assert name not in listed("other")
    assert world.call("other", "GET", f"/apps/{name}/config").status_code == 403
    r = world.call("owner", "POST", f"/apps/{name}/members", {"user": world.names["other"]})
    assert r.status_code == 200 and r.json["members"] == [world.names["other"]]
    assert world.call("other", "GET", f"/apps/{name}/config").status_code == 200
    assert name in listed("other")


def test_only_the_owner_or_an_admin_deletes_an_app_or_chooses_its_members(
        world: World) -> None:
    name = world.new_app(releases=0)
    other = world.names["other"]
    assert world.call("owner", "POST", f"/apps/{name}/members", {"user": other}).status_code == 200
    refused = world.call("other", "DELETE", f"/apps/{name}")
    assert refused.status_code == 403 and "owner" in refused.json["message"]
    assert world.call("other", "POST", f"/apps/{name}/members",
                      {"user": world.names["owner"]}).status_code == 403
    assert world.call("other", "PATCH", f"/apps/{name}/config",
                      {"set": {"K": "v"}}).status_code == 200, "members still configure"
    left = world.call("other", "DELETE", f"/apps/{name}/members/{other}")
    assert left.status_code == 200 and left.json["members"] == [], "a member may leave"
    assert world.call("other", "GET", f"/apps/{name}/config").status_code == 403
    assert world.call("owner", "DELETE", f"/apps/{name}").status_code == 204


def test_tokens_issue_and_revoke(world: World) -> None:
    user = world.names["other"]
    r = world.call("other", "POST", f"/users/{user}/tokens", {"label": "laptop"})
    assert r.status_code == 201
    token, token_id = r.json["token"], r.json["token_id"]
    me = world.client.get("/me", headers={"Authorization": f"Bearer {token}"})
    assert me.json["name"] == user
    with psycopg2.connect(world.owner_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM ledger.events WHERE data::text LIKE %s",
                    (f"%{token}%",))
        assert cur.fetchone()[0] == 0, "tokens are stored only as hashes"
    conn.close()
    assert world.call("other", "DELETE", f"/users/{user}/tokens/{token_id}").status_code == 204
    me = world.client.get("/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 401


def test_the_operator_reissues_a_token_as_the_api_issues_one(world: World) -> None:
    """`tally up` reissuing an agent's lost token goes through api/auth.issue_token: the
    TokenIssued POST /users/NAME/tokens makes, with the operator as actor; both tokens open."""
    from api.auth import issue_token
    from ledger import LedgerError

    name = world.names["agent"]
    token = issue_token(world.ledger, name, actor="tally up", label="reissued by tally up")
    for t in (token, world.tokens["agent"]):
        me = world.client.get("/me", headers={"Authorization": f"Bearer {t}"})
        assert me.status_code == 200 and me.json["name"] == name
    last = world.ledger.read_stream(f"user-{name}")[-1]
    assert (last.type, last.data["label"], last.metadata["actor"]) == (
        "TokenIssued", "reissued by tally up", "tally up")
    assert token not in str(last.data), "only the hash is stored"
    with pytest.raises(LedgerError, match="no user named"):
        issue_token(world.ledger, f"nobody-{uid()}")


def test_two_writers_on_one_version_one_wins_other_gets_409_with_state(world: World) -> None:
    from api import decide
    from api.errors import Conflict

    name = world.new_app(releases=1)
    svc = world.client.application.extensions["tally"]
    owner = svc.directory().lookup(world.tokens["owner"])
    first, second = svc.load_app(name), svc.load_app(name)
    svc.commit(first, decide.scale(first, {"web": 3}), owner)
    with pytest.raises(Conflict) as info:
        svc.commit(second, decide.scale(second, {"web": 4}), owner)
    assert info.value.status == 409 and info.value.extra["current"]["scale"] == {"web": 3}
    assert world.call("owner", "GET", f"/apps/{name}").json["scale"] == {"web": 3}


def test_a_worker_whose_copy_is_behind_decides_again_without_409(world: World) -> None:
    """Writes decide on the worker's own fold of the app (no read); one written meanwhile
    by another worker is caught by the expected version and the request decided again on
    the fresh state: no 409 for a client that raced nobody, and no update lost."""
    name = world.new_app(releases=1)
    second = create_app(world.client.application.extensions["tally"].settings).test_client()
    owner = {"Authorization": f"Bearer {world.tokens['owner']}"}
    first = world.client
    assert first.post(f"/apps/{name}/scale", json={"scale": {"web": 2}},
                      headers=owner).status_code == 200
    assert second.post(f"/apps/{name}/scale", json={"scale": {"worker": 1}},
                       headers=owner).status_code == 200
    r = first.post(f"/apps/{name}/scale", json={"scale": {"web": 3}}, headers=owner)
    assert r.status_code == 200, r.json
    assert r.json["scale"] == {"web": 3, "worker": 1}
    # a refusal decided on a copy that is behind is decided again on the fresh state:
    # the first worker has not seen the release that brings a `clock` process type
    files = {**BUNDLE, "Procfile": BUNDLE["Procfile"] + "clock: python clock.py\n"}
    assert second.post(f"/apps/{name}/releases", data=pack_files(files), headers={
        **owner, "Content-Type": "application/gzip"}).status_code == 201
    r = first.post(f"/apps/{name}/scale", json={"scale": {"clock": 1}}, headers=owner)
    assert r.status_code == 200, r.json
    assert r.json["scale"] == {"web": 3, "worker": 1, "clock": 1}
    # so is a no-op: the first worker still thinks maintenance is off
    assert second.put(f"/apps/{name}/maintenance", json={"enabled": True},
                      headers=owner).status_code == 200
    r = first.put(f"/apps/{name}/maintenance", json={"enabled": False}, headers=owner)
    assert r.status_code == 200 and r.json["maintenance"] is False, r.json
    assert second.get(f"/apps/{name}", headers=owner).json["maintenance"] is False


def test_a_change_recorded_after_the_request_arrived_is_a_409(world: World) -> None:
    from datetime import UTC, datetime

    from api import decide
    from api.errors import Conflict

    name = world.new_app(releases=1)
    svc = world.client.application.extensions["tally"]
    other = create_app(svc.settings).extensions["tally"]
    owner = svc.directory().lookup(world.tokens["owner"])
    svc.load_app(name)  # this worker's copy
    arrived = datetime.now(UTC)  # our request arrives, then the other worker writes
    other.command(name, owner, lambda s: decide.scale(s, {"web": 5}))
    with pytest.raises(Conflict) as info:
        svc.command(name, owner, lambda s: decide.scale(s, {"web": 4}), arrived=arrived)
    assert info.value.extra["current"]["scale"] == {"web": 5}


def test_a_lost_create_race_does_not_show_the_winners_app(world: World) -> None:
    """The 409 carries the current state only to those who may see that app."""
    from api import decide
    from api.errors import Conflict

    name = f"race-{uid()}"
    svc = world.client.application.extensions["tally"]
    other = svc.directory(force=True).lookup(world.tokens["other"])
    before = svc.load_app(name)
    assert world.call("owner", "POST", "/apps", {"name": name}).status_code == 201
    world.call("owner", "POST", f"/apps/{name}/domains", {"domain": f"{name}.example.com"})
    with pytest.raises(Conflict) as info:
        svc.commit(before, decide.create_app(before, other.name), other)
    assert "current" not in info.value.body(), info.value.body()


def test_concurrent_scale_requests_never_lose_an_update(world: World) -> None:
    name = world.new_app(releases=1)
    statuses: list[int] = []

    def scale(n: int) -> None:
        client = world.client.application.test_client()
        r = client.post(f"/apps/{name}/scale", json={"scale": {"web": n}},
                        headers={"Authorization": f"Bearer {world.tokens['owner']}"})
        statuses.append(r.status_code)
    threads = [threading.Thread(target=scale, args=(n,)) for n in range(2, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 409} and 200 in statuses
    scales = [e for e in world.ledger.read_stream(f"app-{name}") if e.type == "ScaleChanged"]
    assert len(scales) == 1 + statuses.count(200)


# --- bad inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("body, status", [
    ({"name": "A"}, 422), ({"name": "ab"}, 422), ({"name": "x" * 31}, 422),
    ({"name": "bad_name"}, 422), ({"name": "-abc"}, 422), ({"name": "abc-"}, 422),
    ({}, 422), ({"name": 7}, 422), ({"name": "ok-name", "extra": 1}, 422), ([1], 422),
])
def test_create_app_bad_names(world: World, body: Any, status: int) -> None:
    r = world.call("owner", "POST", "/apps", body)
    assert r.status_code == status and r.json["error"] and r.json["message"]
    assert r.json["fields"]


@pytest.mark.parametrize("path, body", [
    ("/apps", {"name": "nl-{uid}\n"}),
    ("/users", {"name": "nl-{uid}\n"}),
    ("/users", {"name": "nl-{uid}", "role": "agent", "host_id": "h1\n"}),
])
def test_a_trailing_newline_is_not_part_of_a_valid_name(world: World, path: str,
                                                        body: dict[str, str]) -> None:
    """`$` matches before a final newline: `blog\n` would be an app beside `blog`."""
    body = {k: v.replace("{uid}", uid()) for k, v in body.items()}
    r = world.call("admin", "POST", path, body)
    assert r.status_code == 422, r.json


def test_not_json_is_400(world: World) -> None:
    r = world.client.post("/apps", data="name=x", headers={
        "Authorization": f"Bearer {world.tokens['owner']}", "Content-Type": "text/plain"})
    assert r.status_code == 400 and r.json["error"] == "bad_request"


@pytest.mark.parametrize("files, why", [
    ({"requirements.txt": ""}, "Procfile"),
    ({"Procfile": "web: x\n"}, "requirements.txt"),
    ({"Procfile": "this is not a procfile\n", "requirements.txt": ""}, "line 1"),
    ({"Procfile": "", "requirements.txt": ""}, "no process type"),
    ({"../evil": "x", "Procfile": "web: x", "requirements.txt": ""}, "outside"),
    ({"/etc/evil": "x", "Procfile": "web: x", "requirements.txt": ""}, "outside"),
])
def test_bad_bundles_refused_with_reason(world: World, files: dict[str, str],
                                         why: str) -> None:
    name = world.new_app(releases=0)
    r = world.call("owner", "POST", f"/apps/{name}/releases", data=pack_files(files))
    assert r.status_code == 422 and why in r.json["message"], r.json


def test_bundle_links_devices_garbage_digest_size(world: World, tmp_path: Path) -> None:
    import io
    import tarfile
    name = world.new_app(releases=0)

    def tar_with(info: tarfile.TarInfo) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for n, text in (("Procfile", b"web: x"), ("requirements.txt", b"")):
                ti = tarfile.TarInfo(n)
                ti.size = len(text)
                tar.addfile(ti, io.BytesIO(text))
            tar.addfile(info)
        return buf.getvalue()
    link = tarfile.TarInfo("data")
    link.type, link.linkname = tarfile.SYMTYPE, "../../etc/passwd"
    dev = tarfile.TarInfo("dev")
    dev.type = tarfile.CHRTYPE
    for bad in (tar_with(link), tar_with(dev), b"not a tarball at all"):
        r = world.call("owner", "POST", f"/apps/{name}/releases", data=bad)
        assert r.status_code == 422, r.json
    good = pack_files(BUNDLE)
    r = world.call("owner", "POST", f"/apps/{name}/releases?digest={'0' * 64}", data=good)
    assert r.status_code == 422 and "digest" in r.json["message"]
    import hashlib
    r = world.call("owner", "POST",
                   f"/apps/{name}/releases?digest={hashlib.sha256(good).hexdigest()}",
                   data=good)
    assert r.status_code == 201
    r = world.call("owner", "POST", f"/apps/{name}/releases", data=b"x" * (300 * 1024))
    assert r.status_code == 413 and r.json["error"] == "too_large"
    r = world.call("owner", "POST", f"/apps/{name}/releases", data=b"")
    assert r.status_code in (400, 422)


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/apps/{app}/scale", {"scale": {"web": -1}}, 422),
    ("POST", "/apps/{app}/scale", {"scale": {"web": 1001}}, 422),
    ("POST", "/apps/{app}/scale", {"scale": {"nope": 1}}, 422),
    ("POST", "/apps/{app}/scale", {"scale": {}}, 422),
    ("POST", "/apps/{app}/scale", {"scale": {"Web!": 1}}, 422),
    ("POST", "/apps/{app}/scale", {"scale": {"web": "two"}}, 422),
    ("PATCH", "/apps/{app}/config", {"set": {"1BAD": "x"}}, 422),
    ("PATCH", "/apps/{app}/config", {"set": {"KEY\n": "x"}}, 422),
    ("PATCH", "/apps/{app}/config", {"unset": ["KEY\n"]}, 422),
    ("PATCH", "/apps/{app}/config", {}, 422),
    ("PATCH", "/apps/{app}/config", {"set": {"A": 1}}, 422),
    ("POST", "/apps/{app}/rollback", {"release": 2}, 422),
    ("POST", "/apps/{app}/rollback", {"release": 99}, 422),
    ("POST", "/apps/{app}/rollback", {"release": "x"}, 422),
    ("POST", "/apps/{app}/domains", {"domain": "not a host"}, 422),
    ("POST", "/apps/{app}/domains", {"domain": "*.*.x.com"}, 422),
    ("POST", "/apps/{app}/domains", {"domain": "{app}.example.com"}, 409),
    ("DELETE", "/apps/{app}/domains/other.example.com", None, 404),
    ("PUT", "/apps/{app}/maintenance", {"enabled": "maybe"}, 422),
    ("POST", "/apps/{app}/members", {"user": "nobody-here"}, 404),
    ("GET", "/apps/{app}/releases/9", None, 404),
    ("GET", "/apps/{app}/releases/9/bundle", None, 404),
    ("GET", "/apps/nope-{app}", None, 404),
    ("GET", "/apps/{app}/events?after=-1", None, 422),
    ("GET", "/apps/{app}/events?limit=0", None, 422),
    ("GET", "/apps/{app}/events?wait=99", None, 422),
    ("GET", "/no/such/route", None, 404),
    ("PUT", "/apps", None, 405),
])
def test_bad_inputs(world: World, method: str, path: str, body: Any, status: int) -> None:
    name = world.new_app(releases=2)
    path = path.replace("{app}", name)
    if isinstance(body, dict) and "domain" in body:
        body = {"domain": body["domain"].replace("{app}", name)}
    r = world.call("owner", method, path, body)
    assert r.status_code == status, r.json
    assert set(r.json) >= {"error", "message", "fields"}


def test_scale_before_any_release_is_422(world: World) -> None:
    name = world.new_app(releases=0)
    r = world.call("owner", "POST", f"/apps/{name}/scale", {"scale": {"web": 1}})
    assert r.status_code == 422 and "deploy first" in r.json["message"]


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer nope", "Basic abc", "token x"])
def test_bad_tokens_401(world: World, header: str) -> None:
    r = world.client.get("/apps", headers={"Authorization": header} if header else {})
    assert r.status_code == 401 and r.json["error"] == "unauthorized"


def test_agent_cannot_download_bundles_not_placed_on_its_host(world: World) -> None:
    name = world.new_app(releases=2)
    assert world.call("agent", "GET", f"/apps/{name}/releases/2/bundle").status_code == 403
    assert world.call("agent", "POST", "/apps", {"name": f"x-{uid()}"}).status_code == 403


def test_agent_reports_only_for_its_host(world: World) -> None:
    name = world.new_app(releases=1)
    elsewhere = world.place(name, 1, host=f"other-{uid()}")
    for iid in (elsewhere, uid()):  # another host's instance, or one never placed
        r = world.call("agent", "POST", f"/instances/{iid}/events",
                       {"type": "InstanceHealthy", "data": {}})
        assert r.status_code == 403, r.json
        assert world.ledger.read_stream(f"instance-{iid}") == []
    iid = world.place(name, 1)
    r = world.call("agent", "POST", f"/instances/{iid}/events",
                   {"type": "InstanceStarted", "data": {"pid": 42, "host_id": "elsewhere"}})
    assert r.status_code == 200
    ev = world.ledger.read_stream(f"instance-{iid}")[0]
    assert ev.data["host_id"] == world.host and ev.metadata["actor"] == world.names["agent"]
    r = world.call("agent", "POST", "/hosts/not-mine/heartbeats", {})
    assert r.status_code == 403
    r = world.call("agent", "POST", f"/instances/{iid}/events",
                   {"type": "InstanceStarted", "data": {"pid": 0}})
    assert r.status_code == 422 and "pid" in r.json["fields"]
    r = world.call("agent", "PUT", f"/hosts/{world.host}",
                   {"address": "10.0.0.1", "port_min": 9000, "port_max": 8000, "capacity": 1})
    assert r.status_code == 422


def test_an_agent_token_cannot_mint_more_tokens(world: World) -> None:
    """A stolen agent token must not outlive its revocation through tokens it issued."""
    r = world.call("agent", "POST", f"/users/{world.names['agent']}/tokens", {})
    assert r.status_code == 403, r.json
    r = world.call("admin", "POST", f"/users/{world.names['agent']}/tokens", {})
    assert r.status_code == 201 and r.json["role"] == "agent"


def test_healthz_and_openapi(world: World) -> None:
    assert world.client.get("/healthz").json["status"] == "ok"
    spec = world.client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.") and "/apps/{name}/scale" in spec["paths"]
    assert "App" in spec["components"]["schemas"]


def test_users_admin_creates_agent_and_member(world: World) -> None:
    name = f"carol-{uid()}"
    r = world.call("admin", "POST", "/users", {"name": name, "role": "member"})
    assert r.status_code == 201 and r.json["token"].startswith("tly_")
    assert world.call("admin", "POST", "/users", {"name": name}).status_code == 409
    r = world.call("admin", "POST", "/users", {"name": f"a-{uid()}", "role": "agent"})
    assert r.status_code == 422
    users = world.call("admin", "GET", "/users").json["items"]
    assert name in [u["name"] for u in users]


def test_why_and_state_at_a_position(world: World) -> None:
    name = world.new_app(releases=1)
    r = world.call("owner", "GET", f"/apps/{name}/why")
    assert r.status_code == 200 and r.json["app"] == name and r.json["serving"] is False
    assert r.json["summary"].startswith(f"{name} is NOT serving")
    head = world.ledger.sequence()
    r = world.call("admin", "GET", f"/state?at={head}&view=apps")
    assert r.status_code == 200, r.json
    assert name in [a["name"] for a in r.json["views"]["apps"]]
    r = world.call("admin", "GET", f"/state?at={head + 1000}")
    assert r.status_code == 422 and "beyond" in r.json["message"]
    r = world.call("admin", "GET", "/state?at=1&view=nope")
    assert r.status_code == 422 and "unknown view" in r.json["message"]


def test_logs_tail_for_the_apps_people_only(world: World) -> None:
    name = world.new_app(releases=0)
    (world.applogs / name).mkdir()
    (world.applogs / name / "current.log").write_text("".join(f"line {i}\n" for i in range(5)))
    r = world.call("owner", "GET", f"/apps/{name}/logs?lines=2")
    assert r.status_code == 200 and r.json["lines"] == ["line 3", "line 4"]
    assert world.call("other", "GET", f"/apps/{name}/logs").status_code == 403
    assert world.call("owner", "GET", f"/apps/{name}/logs?lines=-1").status_code == 422


def test_oversized_json_body_is_413(world: World) -> None:
    r = world.call("owner", "POST", "/apps", {"name": "x" * (2 << 20)})
    assert r.status_code == 413 and r.json["error"] == "too_large"


def test_oversized_chunked_json_body_is_413(world: World, cluster: Any,
                                            tmp_path: Path) -> None:
    """Without a Content-Length (chunked, as gunicorn passes it on), the JSON limit holds
    too, not the larger bundle limit."""
    import io

    client = create_app(Settings(cluster.dsn(), tmp_path, max_bundle_bytes=16 << 20)
                        ).test_client()
    big = b'{"name": "' + b"x" * (2 << 20) + b'"}'
    r = client.open("/apps", method="POST", input_stream=io.BytesIO(big),
                          environ_overrides={"wsgi.input_terminated": True},
                          headers={"Authorization": f"Bearer {world.tokens['owner']}",
                                   "Content-Type": "application/json",
                                   "Transfer-Encoding": "chunked"})
    assert r.status_code == 413 and r.json["error"] == "too_large", r.json


def test_a_silent_host_shows_suspect_then_lost(world: World) -> None:
    """The view stores alive/lost; suspect is derived from the clock at read time."""
    host = f"q-{uid()}"
    world.ledger.append(f"host-{host}", [NewEvent("HostRegistered", {
        "host_id": host, "address": "127.0.0.1", "port_min": 9000, "port_max": 9001,
        "capacity": 1})])
    project_now(world.owner_dsn)

    def state() -> str:
        (row,) = [h for h in world.call("admin", "GET", "/hosts").json["items"]
                  if h["host_id"] == host]
        return row["state"]
    assert state() == "alive"
    wait_until(lambda: state() == "suspect", 15, "a silent host never became suspect")
    world.ledger.append(f"host-{host}", [NewEvent("HostLost", {"host_id": host})])
    project_now(world.owner_dsn)
    assert state() == "lost"


def _sample(dsn: str, app: str, iid: str, at: datetime, requests: int, restarts: int,
            memory: int, cpu: float) -> None:
    """One sample recorded at `at`: a test computes every `at` from one clock reading, so
    the intervals between samples are exact however slowly the inserts go."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO stats.instance_samples (at, app, instance_id, host_id, "
                    "requests, restarts, memory_bytes, cpu_seconds) VALUES "
                    "(%s, %s, %s, 'h1', %s, %s, %s, %s)",
                    (at, app, iid, requests, restarts, memory, cpu))
    conn.close()


def test_stats_sum_requests_and_take_cpu_from_the_samples(world: World) -> None:
    name = world.new_app(releases=0)
    a, b = f"{name}.1.web.a", f"{name}.1.web.b"
    now = datetime.now(UTC)
    for ago, req, restarts, cpu in ((3000, 50, 0, 1.0), (30, 4, 0, 10.0), (20, 6, 0, 12.0),
                                    (10, 3, 1, 0.5)):  # the last: restarted, CPU from zero
        _sample(world.owner_dsn, name, a, now - timedelta(seconds=ago), req, restarts,
                40 * 2**20, cpu)
    _sample(world.owner_dsn, name, b, now - timedelta(seconds=15), 7, 0, 30 * 2**20, 2.0)
    r = world.call("owner", "GET", f"/apps/{name}/stats?minutes=10")
    assert r.status_code == 200, r.json
    got = r.json
    assert (got["requests"], got["requests_per_minute"]) == (20, 2.0)  # 3000 s ago: outside
    first, second = got["instances"]
    assert (first["instance_id"], first["requests"], first["restarts"]) == (a, 13, 1)
    assert first["cpu_percent"] == 20.0  # 2 CPU seconds in 10 s; the restart left out
    assert second["cpu_percent"] is None, "one sample: no rate yet"
    assert got["memory_bytes"] == 70 * 2**20
    assert sum(m["requests"] for m in got["series"]) == 20
    bad = world.call("owner", "GET", f"/apps/{name}/stats?minutes=0")
    assert bad.status_code == 422 and "minutes" in bad.json["fields"]
    assert world.call("other", "GET", f"/apps/{name}/stats").status_code == 403
