"""Add-ons' rules without I/O: the deciders (api/decide.py), the app's fold of its add-ons
(api/state.py), the HAProxy configuration and each app's network reach to its own Redis."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agents.appsdb import haproxy_config
from agents.netrules import Reach, reach_of
from agents.redisaddon import server_config
from api import decide
from api.errors import Conflict, NotFound
from api.state import AppState, fold
from ledger.events import NewEvent, RecordedEvent
from ledger.patroni import HASpec


def _folded(name: str, events: list[NewEvent], owner: str = "ann") -> AppState:
    at = datetime(2026, 12, 6, tzinfo=UTC)
    head = [NewEvent("AppCreated", {"name": name, "owner": owner})]
    recorded = [RecordedEvent(i + 1, i + 1, f"app-{name}", i + 1, e.type, e.data, {}, at)
                for i, e in enumerate(head + events)]
    return fold(name, recorded)


def test_create_sets_the_var_and_one_of_each_kind_per_app() -> None:
    blog = _folded("blog", [])
    events = decide.create_addon(blog, "postgresql", "standard", "postgresql://u:p@h:1/d",
                                 "h:1")
    assert [e.type for e in events] == ["AddonCreated", "ConfigChanged"]
    blog = _folded("blog", events)
    assert blog.config["DATABASE_URL"] == "postgresql://u:p@h:1/d"
    (addon,) = blog.addons
    assert (addon.name, addon.owner, addon.plan) == ("postgresql-blog", "blog", "standard")
    with pytest.raises(Conflict, match="already has postgresql-blog"):
        decide.create_addon(blog, "postgresql", "standard", "x", "")
    by_hand = _folded("shop", [NewEvent("ConfigChanged", {
        "app": "shop", "set": {"REDIS_URL": "redis://x"}, "config_version": 1})])
    with pytest.raises(Conflict, match="already has a REDIS_URL"):
        decide.create_addon(by_hand, "redis", "mini", "redis://y", "")


def test_attach_only_between_apps_of_one_owner_under_a_free_var() -> None:
    blog = _folded("blog", decide.create_addon(_folded("blog", []), "postgresql", "standard",
                                               "postgresql://b", "h:1"))
    shop = _folded("shop", [])
    events = decide.attach_addon(shop, blog, "postgresql-blog", "blog_db")
    assert events[0].data["config_var"] == "BLOG_DB_URL"
    shop = _folded("shop", events)
    assert shop.config["BLOG_DB_URL"] == "postgresql://b" and shop.addons[0].owner == "blog"
    with pytest.raises(Conflict, match="already reaches"):
        decide.attach_addon(shop, blog, "postgresql-blog", "other")
    with pytest.raises(Conflict, match="different owners"):
        decide.attach_addon(_folded("evil", [], owner="bob"), blog, "postgresql-blog", None)
    with pytest.raises(NotFound):
        decide.attach_addon(_folded("evil", []), blog, "redis-blog", None)
    with pytest.raises(Conflict, match="destroy it"):
        decide.detach_addon(blog, "postgresql-blog")
    with pytest.raises(Conflict, match="detach it"):
        decide.destroy_addon(shop, "postgresql-blog", "")
    shop = _folded("shop", events + decide.detach_addon(shop, "postgresql-blog"))
    assert shop.addons == () and "BLOG_DB_URL" not in shop.config


def test_deleting_an_app_destroys_its_own_addons_and_detaches_the_others() -> None:
    s = _folded("shop", [
        NewEvent("AddonCreated", {"app": "shop", "addon": "redis-shop", "kind": "redis",
                                  "plan": "mini", "config_var": "REDIS_URL"}),
        NewEvent("AddonAttached", {"app": "shop", "addon": "postgresql-blog",
                                   "kind": "postgresql", "owner": "blog",
                                   "config_var": "DATABASE_URL"})])
    events = decide.delete_app(s)
    assert [(e.type, e.data["addon"]) for e in events[:-1]] == [
        ("AddonDestroyed", "redis-shop"), ("AddonDetached", "postgresql-blog")]
    assert events[-1].type == "AppDeleted"


def test_haproxy_sends_connections_to_the_patroni_primary_only() -> None:
    spec = HASpec(Path("/x"), "tally-apps", ("a", "b"), (5443, 5444), (8008, 8009),
                  (2379, 2380))
    conf = haproxy_config(spec, 5445)
    assert "bind 127.0.0.1:5445" in conf and "option httpchk GET /primary" in conf
    assert "server a 127.0.0.1:5443 maxconn 300 check port 8008" in conf
    assert "server b 127.0.0.1:5444 maxconn 300 check port 8009" in conf
    assert "on-marked-down shutdown-sessions" in conf


def test_redis_has_a_password_no_default_user_and_the_plans_limits() -> None:
    conf = server_config(Path("/r/blog"), 6401, "s3cret", "cache", "b4ckup")
    assert "user default off" in conf and "user app on >s3cret ~* &* +@all -@admin" in conf
    assert "maxmemory 100mb" in conf and "maxmemory-policy allkeys-lru" in conf
    assert "appendonly yes" in conf and "bind 127.0.0.1" in conf


def test_each_app_reaches_its_own_addons_only_whatever_its_config_names() -> None:
    """The ports come from where the ledger says each app's add-ons run, not from its
    config: a member who sets shop's CACHE_URL to blog's Redis opens nothing to shop."""
    from api.routes_hosts import addon_places
    from api.state import Addon, AppState

    blog = AppState("blog", addons=(Addon("redis-blog", "redis", "mini", "REDIS_URL", "blog",
                                          "127.0.0.1:6401"),))
    shop = AppState("shop", configs={0: {"CACHE_URL": "redis://app:p@127.0.0.1:6401/0"}},
                    addons=(Addon("redis-shop", "redis", "mini", "REDIS_URL", "shop",
                                  "127.0.0.1:6402"),
                            Addon("postgresql-blog", "postgresql", "", "BLOG_DB_URL", "blog",
                                  "127.0.0.1:5445")))
    old = AppState("old", configs={0: {"DATABASE_URL": "postgresql://u:p@127.0.0.1:5443/d"}},
                   addons=(Addon("postgresql-old", "postgresql", "", "DATABASE_URL", "old"),))
    places = {s.name: addon_places(s) for s in (blog, shop, old)}
    assert places == {"blog": ["127.0.0.1:6401"], "shop": ["127.0.0.1:5445", "127.0.0.1:6402"],
                      "old": ["127.0.0.1:5443"]}  # recorded without `where`: its var's URL
    reach = reach_of([], places, {"blog": 1001, "shop": 1002}, "127.0.0.1",
                     frozenset({5445, 6401, 6402}))
    assert sorted(reach, key=lambda r: r.uid) == [Reach(1001, frozenset({6401})),
                                                  Reach(1002, frozenset({5445, 6402}))]


def test_root_signals_no_process_a_redis_pid_file_names_unless_it_is_that_redis(
        tmp_path: Path) -> None:
    """The pid file is the server user's to write: a compromised Redis naming another
    process (the API, say) gets nothing killed by root."""
    from agents import redisaddon

    (tmp_path / "redis.pid").write_text(str(os.getpid()))  # alive, but not a redis-server
    assert redisaddon._pid(tmp_path) is None


def test_a_redis_backup_key_that_is_a_link_is_not_read(tmp_path: Path) -> None:
    """The app's Redis folder is the redis user's: a backup.key it swapped for a link to a
    file only root reads must not be read by root and sent to its server as a password."""
    from agents import redisaddon

    secret = tmp_path / "secret"
    secret.write_text("root-only")
    app_dir = tmp_path / "r" / "blog"
    app_dir.mkdir(parents=True)
    (app_dir / "port").write_text("1")
    (app_dir / "backup.key").symlink_to(secret)
    with pytest.raises(redisaddon.RedisError, match="no backup user"):
        redisaddon.copy_rdb(tmp_path / "r", "blog", tmp_path / "out.rdb")


def test_a_destroyed_addon_not_yet_dropped_blocks_a_new_one_until_dropped() -> None:
    """AddonDestroyed without AddonDropped (a drop that failed): a new add-on of that name
    would meet the old database, so it waits (409 naming the reaper) until the drop is
    recorded, across a delete and re-create of the app too."""
    from agents.addonreaper import undropped

    gone = {"app": "blog", "addon": "postgresql-blog", "kind": "postgresql"}
    made = decide.create_addon(_folded("blog", []), "postgresql", "standard", "u", "h:1")
    destroyed = [*made, NewEvent("AddonDestroyed", gone), NewEvent("AppDeleted",
                                                                   {"name": "blog"}),
                 NewEvent("AppCreated", {"name": "blog", "owner": "ann"})]
    blog = _folded("blog", destroyed)
    assert blog.undropped == {"postgresql-blog": "postgresql"} and blog.addons == ()
    with pytest.raises(Conflict, match="not dropped yet: the add-ons' reaper"):
        decide.create_addon(blog, "postgresql", "standard", "u", "h:1")
    decide.create_addon(blog, "redis", "mini", "r", "h:2")  # another kind is free
    dropped = _folded("blog", [*destroyed, NewEvent("AddonDropped", gone)])
    assert dropped.undropped == {}
    assert decide.create_addon(dropped, "postgresql", "standard", "u", "h:1")

    at = datetime(2026, 12, 6, tzinfo=UTC)
    recorded = [RecordedEvent(i + 1, i + 1, f"app-{d['app']}", i + 1, t, d, {}, at)
                for i, (t, d) in enumerate([
                    ("AddonDestroyed", gone),
                    ("AddonDestroyed", {**gone, "app": "shop", "addon": "redis-shop",
                                        "kind": "redis"}),
                    ("AddonDropped", {**gone, "app": "shop", "addon": "redis-shop",
                                      "kind": "redis"})])]
    (left,) = undropped(recorded).items()
    assert (left[0], left[1].app, left[1].kind) == ("postgresql-blog", "blog", "postgresql")
