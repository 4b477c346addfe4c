"""What a builder token opens (api/routes_builders.py): the build queue, claims, and only
the claims it holds; and what the API checks of a slug before it records it. A builder
holds no ledger credentials: these routes are all it has (DESIGN.md "Trust boundaries")."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

from api.auth import create_user
from ledger import NewEvent
from ledger.builds import build_stream, fold
from ledger.uids import build_uid
from tests.conftest import session_uids
from tests.integration.test_api import World, uid, world  # noqa: F401
from tests.waiting import wait_until


def _slug(payload: bytes = b"x = 1\n") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("app.py")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _build(w: World, app: str, release: int) -> list:
    created = [e for e in w.ledger.read_stream(f"app-{app}") if e.type == "ReleaseCreated"
               and e.data["release"] == release][0]
    return w.ledger.read_stream(build_stream(app, created.version))


def _second_builder(w: World) -> str:
    if "builder2" not in w.tokens:
        w.tokens["builder2"] = create_user(w.ledger, f"builder-{uid()}", "builder",
                                           f"b2-{w.host}")
    return "builder2"


def test_one_builder_wins_a_claim_and_only_it_acts_on_the_build(world: World) -> None:  # noqa: F811
    w = world
    app = w.new_app(releases=2)
    two = _second_builder(w)
    queue = w.call("builder", "GET", "/builds/queue").json["builds"]
    mine = [(b["release"], b["attempt"]) for b in queue if b["app"] == app]
    assert mine == [(2, 1), (1, 1)], "newest first, first attempts"
    for who in ("admin", "owner", "agent"):
        assert w.call(who, "GET", "/builds/queue").status_code == 403

    claim = w.call("builder", "POST", f"/apps/{app}/releases/2/build/claim", {"lease_s": 30})
    assert claim.status_code == 200, claim.json
    job = claim.json
    assert job["attempt"] == 1 and job["reused_from"] is None
    assert job["slug_max_bytes"] == 500 * 2**20, "the default slug_mb quota"
    created = w.ledger.read_stream(f"app-{app}")[0]
    assert job["build_uid"] == build_uid(created.data["uid"], *session_uids())
    lost = w.call(two, "POST", f"/apps/{app}/releases/2/build/claim", {"lease_s": 30})
    assert lost.status_code == 409, "of two builders exactly one wins"
    queue = w.call("builder", "GET", "/builds/queue").json["builds"]
    assert [b["release"] for b in queue if b["app"] == app] == [1]

    base = f"/apps/{app}/releases/2/build"
    for method, path, body in [("POST", f"{base}/renew", {"attempt": 1}),
                               ("POST", f"{base}/output", {"attempt": 1, "text": "evil\n"}),
                               ("POST", f"{base}/failed", {"attempt": 1, "reason": "sabotage"}),
                               ("GET", f"{base}/bundle?attempt=1", None)]:
        r = w.call(two, method, path, body)
        assert r.status_code == 409, (path, r.status_code)
    assert w.call(two, "PUT", f"{base}/slug?attempt=1", data=_slug()).status_code == 409
    assert w.call("builder", "POST", f"{base}/renew", {"attempt": 2}).status_code == 409

    got = w.call("builder", "GET", f"{base}/bundle?attempt=1")
    assert got.status_code == 200
    assert hashlib.sha256(got.data).hexdigest() == job["bundle_digest"]
    got.close()
    assert w.call("builder", "POST", f"{base}/renew", {"attempt": 1}).status_code == 200
    assert w.call("builder", "POST", f"{base}/output",
                  {"attempt": 1, "text": "-----> Building\n"}).status_code == 200
    refused = w.call("builder", "PUT", f"{base}/slug?attempt=1", data=b"not a tar.gz")
    assert refused.status_code == 422
    data = _slug()
    r = w.call("builder", "PUT", f"{base}/slug?attempt=1&seconds=1.5", data=data)
    assert r.status_code == 201, r.json
    b = fold(_build(w, app, 2))
    assert (b.status, b.builder, b.slug_digest) == ("succeeded", f"b-{w.host}",
                                                    hashlib.sha256(data).hexdigest())
    assert [e.type for e in _build(w, app, 2)] == ["BuildStarted", "BuildClaimRenewed",
                                                   "BuildSucceeded"]
    assert w.call("builder", "POST", f"{base}/failed",
                  {"attempt": 1, "reason": "late"}).status_code == 409, "it has its outcome"

    # the same code again (a config change on v2): its claim gets v2's slug, no build
    assert w.call("owner", "PATCH", f"/apps/{app}/config",
                  {"set": {"K": "v"}}).status_code == 200
    again = w.call("builder", "POST", f"/apps/{app}/releases/3/build/claim", {"lease_s": 30})
    assert again.status_code == 200 and again.json["reused_from"] == 2
    assert fold(_build(w, app, 3)).slug_digest == b.slug_digest

    # a failure is recorded with its reason and last lines
    assert w.call("builder", "POST", f"/apps/{app}/releases/1/build/claim", {}).status_code == 200
    r = w.call("builder", "POST", f"/apps/{app}/releases/1/build/failed",
               {"attempt": 1, "reason": "pip install failed", "log_tail": ["ERROR: x"]})
    assert r.status_code == 200
    assert fold(_build(w, app, 1)).reason == "pip install failed"


def test_a_slug_over_the_apps_slug_quota_is_refused(world: World) -> None:  # noqa: F811
    w = world
    app = w.new_app(releases=1)
    w.ledger.append(f"quota-app:{app}", [NewEvent("QuotaSet", {
        "subject": "app", "name": app, "slug_mb": 1})])
    job = w.call("builder", "POST", f"/apps/{app}/releases/1/build/claim", {}).json
    assert job["slug_max_bytes"] == 2**20
    big = _slug(os.urandom(3 * 2**20))
    r = w.call("builder", "PUT", f"/apps/{app}/releases/1/build/slug?attempt=1", data=big)
    assert r.status_code == 413 and "slug_mb" in r.json["message"], r.json
    assert fold(_build(w, app, 1)).status == "building"


def test_an_expired_claim_is_offered_again_and_its_old_holder_is_told(world: World) -> None:  # noqa: F811
    w = world
    app = w.new_app(releases=1)
    two = _second_builder(w)
    first = w.call("builder", "POST", f"/apps/{app}/releases/1/build/claim", {"lease_s": 1})
    assert first.status_code == 200

    def offered_again() -> list:
        queue = w.call(two, "GET", "/builds/queue").json["builds"]
        return [b["attempt"] for b in queue if b["app"] == app]
    assert wait_until(offered_again, 30, "the claim's lease running out", interval=0.2) == [2]
    taken = w.call(two, "POST", f"/apps/{app}/releases/1/build/claim", {"lease_s": 30})
    assert taken.status_code == 200 and taken.json["attempt"] == 2
    r = w.call("builder", "POST", f"/apps/{app}/releases/1/build/renew", {"attempt": 1})
    assert r.status_code == 409 and "not yours" in r.json["message"]
