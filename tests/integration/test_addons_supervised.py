"""Add-on services under supervisord, as `tally up` runs them: the apps' cluster (etcd,
Patroni, the stable address's NAT watcher or HAProxy) and each app's Redis are its
programs, so kill -9 of the stable address's process or of a Redis costs the apps
seconds, not an outage until someone runs `tally up`. Made as the API host makes them
(tally/api_settings.py) while supervisord runs; detached ones (made with no supervisord)
are handed over by `tally up` (platform.start_addons)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tally import platform, supervise
from tally.api_settings import create_addon, destroy_addon
from tally.config import Config
from tests.conftest import addons_answer, free_port_range, free_ports
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg() -> Iterator[Config]:
    home = Path(tempfile.mkdtemp(prefix="tally-addons-sup-"))
    home.chmod(0o755)
    a, b, proxy, l1, l2 = free_ports(5)
    low, high = free_port_range(4)
    cfg = Config.from_env({"TALLY_HOME": str(home), "TALLY_APPS_DB_PORTS": f"{a},{b}",
                           "TALLY_APPS_DB_PORT": str(proxy), "TALLY_APPS_HA": "patroni",
                           "TALLY_REDIS_PORTS": f"{low}-{high}",
                           "TALLY_LEDGER_PORTS": f"{l1},{l2}"})
    platform.close_home(cfg)
    try:
        yield cfg
    finally:
        supervise.down(cfg)
        platform.stop_addons(cfg)
        cfg.apps_cluster().destroy()
        shutil.rmtree(home, ignore_errors=True)


def _pids(cfg: Config) -> dict[str, int]:
    return {d["name"]: d["pid"] for d in supervise.status(cfg) if d["pid"]}


def test_detached_services_are_handed_over_and_come_back_after_kill_9(cfg: Config) -> None:
    url, _ = create_addon(cfg, "postgresql", "blog", "standard")  # no supervisord: detached
    redis_url, _ = create_addon(cfg, "redis", "blog", "mini")
    assert not supervise.running(cfg)
    supervise.up(cfg, [], {})  # supervisord up, as `tally up` starts it first
    lines = platform.start_addons(cfg, supervised=True)
    assert any("Redis add-ons: blog" in line for line in lines), lines
    pids = _pids(cfg)
    stable = "addons-" + cfg.apps_cluster().address_process  # type: ignore[attr-defined]
    assert {"addons-etcd", "addons-patroni-a", "addons-patroni-b", stable,
            "addons-redis-blog"} <= set(pids), pids
    wait_until(lambda: addons_answer(url, redis_url), 60, "the add-ons through their URLs")
    for name in (stable, "addons-redis-blog"):
        os.kill(pids[name], signal.SIGKILL)
    wait_until(lambda: all(_pids(cfg).get(n) not in (None, pids[n])
                           for n in (stable, "addons-redis-blog")), 60,
               "supervisord restarted the stable address and Redis")
    wait_until(lambda: addons_answer(url, redis_url), 60, "the same URLs answer again")


def test_made_under_supervisord_and_destroyed_out_of_it(cfg: Config) -> None:
    redis_url, _ = create_addon(cfg, "redis", "shop", "mini")
    assert "addons-redis-shop" in _pids(cfg), "a new Redis is supervisord's at once"
    redis.Redis.from_url(redis_url).ping()
    destroy_addon(cfg, "redis", "shop")
    assert "addons-redis-shop" not in {d["name"] for d in supervise.status(cfg)}
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url, socket_connect_timeout=2).ping()
    assert not (cfg.redis_dir / "shop").exists()


def test_a_supervised_redis_is_restored_from_an_rdb_and_supervised_again(cfg: Config) -> None:
    """Under supervisord a restore must keep the server down while its data is replaced
    (a program that is merely killed comes back at once), then hand it back."""
    from agents import redisaddon

    url, _ = create_addon(cfg, "redis", "cafe", "mini")
    client = redis.Redis.from_url(url)
    client.set("menu", "tea")
    rdb = cfg.home / "cafe.rdb"
    redisaddon.copy_rdb(cfg.redis_dir, "cafe", rdb)
    client.set("menu", "coffee")
    before = _pids(cfg)["addons-redis-cafe"]
    steps: list[str] = []
    keys = redisaddon.restore_rdb(cfg.redis_dir, "cafe", rdb,
                                  platform.redis_launch(cfg, True), steps.append)
    assert keys == 1 and any(s.startswith("copying: 100%") for s in steps), steps
    assert _pids(cfg).get("addons-redis-cafe") not in (None, before), "supervised again"
    assert redis.Redis.from_url(url).get("menu") == b"tea"
    assert not (cfg.redis_dir / "cafe" / "appendonlydir.before").exists()
    destroy_addon(cfg, "redis", "cafe")
