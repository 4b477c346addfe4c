"""Add-ons across `tally down && tally up`, as a person drives them on private ports and a
private home: the first `addons:create` makes the apps' cluster (Patroni, etcd, its stable address)
and a Redis under the running supervisord; after `tally down` and `tally up` both answer at
the same URLs, supervisord runs them again, and `addons:create` works for a new app.
(Before: the apps' cluster was not started by `tally up`, apps answered 500 and
`addons:create` refused with `already has a DATABASE_URL`.)"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tally import supervise
from tally.config import Config
from tests.conftest import addons_answer, remove_home, up_env
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


def test_addons_answer_at_the_same_urls_after_down_and_up() -> None:
    home = Path(tempfile.mkdtemp(prefix="tally-up-addons-"))
    home.chmod(0o755)
    env = up_env(home)
    cfg = Config.from_env(env)

    def tally(*args: str) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "tally.cli", *args], env=env,
                             capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, (args, out.stderr)
        return out
    try:
        tally("up")
        tally("apps:create", "blog")
        tally("addons:create", "-a", "blog", "postgresql")
        tally("addons:create", "-a", "blog", "redis")
        urls = json.loads(tally("config", "-a", "blog", "--json").stdout)
        assert addons_answer(urls["DATABASE_URL"], urls["REDIS_URL"])
        stable = "addons-" + cfg.apps_cluster().address_process  # type: ignore[attr-defined]
        services = {"addons-etcd", "addons-patroni-a", "addons-patroni-b", stable,
                    "addons-redis-blog"}
        assert services <= {d["name"] for d in supervise.status(cfg)}

        tally("down")
        assert not addons_answer(urls["DATABASE_URL"], urls["REDIS_URL"])
        again = tally("up")
        assert "apps' database cluster" in again.stderr and "Redis add-ons: blog" in again.stderr
        assert json.loads(tally("config", "-a", "blog", "--json").stdout) == urls
        wait_until(lambda: addons_answer(urls["DATABASE_URL"], urls["REDIS_URL"]), 60,
                   "the add-ons at their old URLs")
        # supervisord calls a program RUNNING only once it has lived START_SECS; an add-on
        # that answers sooner is still STARTING.
        wait_until(lambda: services <= {d["name"] for d in supervise.status(cfg)
                                        if d["state"] == "RUNNING"},
                   30, "the add-ons' daemons RUNNING under supervisord")
        tally("apps:create", "shop")
        tally("addons:create", "-a", "shop", "postgresql")
    finally:
        subprocess.run([sys.executable, "-m", "tally.cli", "down"], env=env,
                       capture_output=True, timeout=400)
        remove_home(home)
