"""The projectors' handlers, in memory: no PostgreSQL needed to know what a view says."""

from __future__ import annotations

from datetime import timedelta

import pytest

import projectors
from ledger.vocabulary import Liveness
from projectors import HandlerFailed, Projector, project
from projectors.hosts import host_state
from projectors.tables import Tables
from tests.unit.test_why import T0, History, recorded


def views(history: History) -> dict[str, Tables]:
    return project(projectors.ALL, recorded(history.appends))


def rows(v: dict[str, Tables], view: str) -> list[dict]:
    return list(v[projectors.owner_of(view).name].all(view))


# -- Tables ------------------------------------------------------------------------------


def test_tables_track_the_last_change_per_key_and_keep_indexes() -> None:
    t = Tables({"r": ("app", "n")}, {"r": "app"})
    t.load("r", [{"app": "a", "n": 1, "s": "x"}])
    assert t.take_changes() == {}
    t.put("r", {"app": "a", "n": 2, "s": "y"})
    t.update("r", t.get("r", "a", 1), s="z")
    t.put("r", {"app": "b", "n": 1, "s": "w"})
    t.delete("r", "b", 1)
    assert sorted(r["n"] for r in t.by("r", "a")) == [1, 2]
    assert t.by("r", "b") == []
    changes = t.take_changes()["r"]
    assert changes[("a", 1)]["s"] == "z" and changes[("b", 1)] is None
    assert t.take_changes() == {}


def test_a_failing_handler_names_its_event() -> None:
    def boom(t: Tables, e: object) -> None:
        raise KeyError("oops")

    p = Projector("boom", {"x": ("id",)}, {"AppCreated": boom}, public=("x",))
    events = recorded(History("blog").host("h").created().appends)
    with pytest.raises(HandlerFailed) as failed:
        p.apply(p.new_tables(), events)
    assert failed.value.event.position == 2 and failed.value.applied == 1
    assert "AppCreated at position 2" in str(failed.value)


# -- apps and releases --------------------------------------------------------------------


def test_apps_follow_releases_scale_domains_and_maintenance() -> None:
    h = History("blog").created().released(1).released(2).scaled(2)
    h.add("app-blog", "ScaleChanged", app="blog", scale={"web": 2, "worker": 1})
    h.add("app-blog", "DomainAdded", app="blog", domain="z.example")
    h.add("app-blog", "DomainAdded", app="blog", domain="*.a.example")
    h.add("app-blog", "DomainRemoved", app="blog", domain="z.example")
    h.add("app-blog", "MaintenanceChanged", app="blog", enabled=True)
    h.add("app-blog", "ConfigChanged", app="blog", set={"A": "1"}, config_version=3)
    v = views(h)
    (app,) = rows(v, "apps")
    assert app["current_release"] == 2 and app["release_position"] == 3
    assert app["scale"] == {"web": 2, "worker": 1} and app["domains"] == ["*.a.example"]
    assert app["maintenance"] and app["config_version"] == 3
    statuses = {r["release"]: r["status"] for r in rows(v, "releases")}
    assert statuses == {1: "pending", 2: "pending"}


def test_releases_follow_the_rollout() -> None:
    h = History("blog").created().released(1)
    h.add("placement-blog", "ReleaseDeployed", app="blog", release=1)
    h.released(2).add("placement-blog", "ReleaseDeployed", app="blog", release=2)
    h.released(3).add("placement-blog", "ReleaseFailed", app="blog", release=3,
                      reason="crash loop")
    v = views(h)
    (app,) = rows(v, "apps")
    assert (app["current_release"], app["deployed_release"]) == (3, 2)
    releases = {r["release"]: r for r in rows(v, "releases")}
    assert [releases[n]["status"] for n in (1, 2, 3)] == ["superseded", "deployed", "failed"]
    assert releases[3]["failure_reason"] == "crash loop"


def test_a_deleted_app_leaves_the_views() -> None:
    v = views(History("blog").running("blog").add("app-blog", "AppDeleted", name="blog"))
    assert rows(v, "apps") == [] and rows(v, "releases") == [] and rows(v, "routes") == []


# -- hosts ------------------------------------------------------------------------------


def test_host_state_is_derived_with_the_readers_clock() -> None:
    v = views(History("blog").host("h1").heartbeat("h1", instances=3))
    (host,) = rows(v, "hosts")
    assert host["running_instances"] == 3 and host["heartbeat_position"] == 2
    beat, live = host["last_heartbeat"], Liveness(ttl=15, suspect_after=5)
    assert host_state(host, beat + timedelta(seconds=1), live) == "alive"
    assert host_state(host, beat + timedelta(seconds=6), live) == "suspect"
    assert host_state(host, beat + timedelta(seconds=16), live) == "expired"
    lost = views(History("b").host("h1").add("host-h1", "HostLost", host_id="h1"))
    assert host_state(rows(lost, "hosts")[0], T0, live) == "lost"
    back = views(History("b").host("h1").add("host-h1", "HostLost", host_id="h1")
                 .heartbeat("h1"))
    assert rows(back, "hosts")[0]["state"] == "alive"


# -- placements and instances -----------------------------------------------------------


def test_instances_record_crashes_and_leave_once_unplaced_and_stopped() -> None:
    h = History("blog").host("h1").created().released().placed("i1", "h1")
    h.instance("InstanceStarted", "i1", "h1", pid=5)
    h.instance("InstanceExited", "i1", "h1", exit_code=2, restarts=3, log_tail=["boom"])
    (inst,) = rows(views(h), "instances")
    assert (inst["state"], inst["exit_code"], inst["restarts"], inst["log_tail"]) == (
        "exited", 2, 3, ["boom"])
    assert inst["app"] == "blog" and inst["placed"]
    h.instance("InstanceStarted", "i1", "h1", pid=6)
    h.add("placement-blog", "InstanceUnplaced", instance_id="i1", app="blog")
    v = views(h)
    assert rows(v, "placements") == []
    assert rows(v, "instances")[0]["placed"] is False  # still running: still observed
    h.instance("InstanceStopped", "i1", "h1")
    assert rows(views(h), "instances") == []


# -- routes -----------------------------------------------------------------------------


def test_routes_send_each_hostname_to_healthy_current_web_backends() -> None:
    h = History("blog").running("blog")
    h.domain("blog", "*.blog.example")
    h.placed("i2", "blog-h1", port=9002).instance("InstanceStarted", "i2", "blog-h1", pid=9)
    v = views(h)
    routes = {r["hostname"]: r for r in rows(v, "routes")}
    assert set(routes) == {"blog.tally.local", "*.blog.example"}
    assert routes["*.blog.example"]["backends"] == ["10.1.0.7:9001"]  # i2 not healthy yet
    h.instance("InstanceHealthy", "i2", "blog-h1")
    assert rows(views(h), "routes")[0]["backends"] == ["10.1.0.7:9001", "10.1.0.7:9002"]


def test_a_route_belongs_to_the_claims_holder_never_to_the_last_writer() -> None:
    h = History("blog").running("blog").domain("blog", "www.blog.example")
    evil = History("evil").created().released()
    h.appends += evil.appends
    h.add("app-evil", "DomainAdded", app="evil", domain="www.blog.example")  # no claim
    h.add("app-evil", "DomainAdded", app="evil", domain="blog.tally.local")
    h.add("domain-wildcard:tally.local", "DomainClaimed", domain="*.tally.local", app="evil")
    h.add("app-evil", "DomainAdded", app="evil", domain="*.tally.local")  # reserved
    owners = {r["hostname"]: r["app"] for r in rows(views(h), "routes")}
    assert owners == {"blog.tally.local": "blog", "www.blog.example": "blog",
                      "evil.tally.local": "evil"}
    h.add("app-evil", "DomainRemoved", app="evil", domain="www.blog.example")
    h.add("domain-www.blog.example", "DomainReleased", domain="www.blog.example", app="evil")
    owners = {r["hostname"]: r["app"] for r in rows(views(h), "routes")}
    assert owners["www.blog.example"] == "blog", "a release by a non-holder changes nothing"
    h.add("app-blog", "DomainRemoved", app="blog", domain="www.blog.example")
    h.add("domain-www.blog.example", "DomainReleased", domain="www.blog.example", app="blog")
    h.domain("evil", "www.blog.example")
    owners = {r["hostname"]: r["app"] for r in rows(views(h), "routes")}
    assert owners["www.blog.example"] == "evil", "released, then claimed by another app"


def test_the_platform_suffix_comes_from_the_ledger() -> None:
    h = History("blog").running("blog").domain("blog", "blog.localhost")
    assert {r["hostname"] for r in rows(views(h), "routes")} == {
        "blog.tally.local", "blog.localhost"}
    h.add("platform-names", "PlatformSuffixSet", suffix="localhost")
    assert {r["hostname"] for r in rows(views(h), "routes")} == {"blog.localhost"}
    version = rows(views(h), "routes_version")[0]["version"]
    assert version == len(h.appends), "every app's routes moved"


def test_a_new_release_routes_only_once_its_instances_are_healthy() -> None:
    h = History("blog").running("blog").released(2)
    v = views(h)
    assert rows(v, "routes")[0]["backends"] == []
    h.placed("i9", "blog-h1", port=9009, release=2)
    h.instance("InstanceHealthy", "i9", "blog-h1")
    assert rows(views(h), "routes")[0]["backends"] == ["10.1.0.7:9009"]


def test_during_a_rollout_both_releases_serve_and_a_failed_one_never() -> None:
    h = History("blog").running("blog")
    h.add("placement-blog", "ReleaseDeployed", app="blog", release=1)
    h.released(2).placed("i2", "blog-h1", port=9002, release=2)
    h.instance("InstanceHealthy", "i2", "blog-h1")
    assert rows(views(h), "routes")[0]["backends"] == ["10.1.0.7:9001", "10.1.0.7:9002"]
    h.add("placement-blog", "ReleaseFailed", app="blog", release=2, reason="deadline")
    assert rows(views(h), "routes")[0]["backends"] == ["10.1.0.7:9001"]


def test_routes_version_moves_on_route_changes_only() -> None:
    h = History("blog").running("blog")
    version = rows(views(h), "routes_version")[0]["version"]
    h.heartbeat("blog-h1").heartbeat("blog-h1")
    assert rows(views(h), "routes_version")[0]["version"] == version
    h.add("host-blog-h1", "HostLost", host_id="blog-h1")
    v = views(h)
    assert rows(v, "routes")[0]["backends"] == []
    assert rows(v, "routes_version")[0]["version"] == len(h.appends) > version
    h.add("app-blog", "MaintenanceChanged", app="blog", enabled=True)
    assert rows(views(h), "routes")[0]["maintenance"] is True


# -- backups ----------------------------------------------------------------------------


def test_backups_keep_the_retained_set_and_the_last_failure() -> None:
    h = History("x")
    for bid in ("b1", "b2"):
        h.add("backup-ledger", "BackupStarted", backup_id=bid, target="ledger")
        h.add("backup-ledger", "BackupCompleted", backup_id=bid, target="ledger",
              size_bytes=10, location=f"/b/{bid}", digest="cd" * 32)
    h.add("backup-ledger", "BackupVerified", backup_id="b2", target="ledger")
    h.add("backup-ledger", "BackupPruned", backup_id="b1", target="ledger")
    h.add("backup-ledger", "BackupStarted", backup_id="b3", target="ledger")
    h.add("backup-ledger", "BackupFailed", backup_id="b3", target="ledger", error="disk full")
    (b,) = rows(views(h), "backups")
    assert [(r["backup_id"], r["verified"]) for r in b["retained"]] == [("b2", True)]
    assert b["last_ok_backup_id"] == "b2" and b["last_failure_error"] == "disk full"
    assert b["running"] == {}


def test_a_backup_counts_as_good_only_once_verified() -> None:
    h = History("x")
    h.add("backup-ledger", "BackupStarted", backup_id="b1", target="ledger")
    h.add("backup-ledger", "BackupCompleted", backup_id="b1", target="ledger",
          size_bytes=10, location="/b/b1", digest="cd" * 32)
    (b,) = rows(views(h), "backups")
    assert b["last_ok_backup_id"] is None and b["retained"][0]["verified"] is False
    h.add("backup-ledger", "BackupFailed", backup_id="b1", target="ledger",
          error="pg_verifybackup: checksum mismatch", stage="verify")
    (b,) = rows(views(h), "backups")
    assert b["last_ok_backup_id"] is None and b["retained"] == []
    assert b["last_failure_backup_id"] == "b1"


def test_unknown_names_are_refused_with_the_known_ones() -> None:
    with pytest.raises(projectors.UnknownProjector, match="views: apps, backups"):
        projectors.owner_of("nope")
    with pytest.raises(projectors.UnknownProjector, match="projectors: apps, hosts"):
        projectors.by_name("nope")
