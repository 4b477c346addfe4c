"""agents/dbsize.py: what an add-on database should be under its size limit (pure)."""

from __future__ import annotations

from agents import dbsize
from agents.dbsize import OK, READ_ONLY, REFUSED, Change, plan, state_for

MiB = 2**20


def test_read_only_past_the_limit_refused_past_a_quarter_more() -> None:
    assert state_for(100 * MiB, 100) == OK
    assert state_for(100 * MiB + 1, 100) == READ_ONLY
    assert state_for(125 * MiB, 100) == READ_ONLY
    assert state_for(125 * MiB + 1, 100) == REFUSED


def test_only_changes_are_planned_and_only_for_app_databases() -> None:
    sizes = {"app_blog": 110 * MiB, "app_shop_eu": 10 * MiB, "app_big": 300 * MiB,
             "tally_apps": 10**12}
    states = {"app_blog": READ_ONLY, "app_shop_eu": READ_ONLY, "app_big": OK}
    limits = {"blog": 100, "shop-eu": 100, "big": 100}
    changes = plan(sizes, states, limits.__getitem__)
    assert [(c.database, c.before, c.after) for c in changes] == [
        ("app_big", OK, REFUSED), ("app_shop_eu", READ_ONLY, OK)]
    assert dbsize.app_of("app_shop_eu") == "shop-eu" and dbsize.app_of("tally_apps") is None


def test_each_change_says_what_and_why() -> None:
    said = Change("app_blog", 110 * MiB, 100, OK, READ_ONLY).message()
    assert said.startswith("app_blog is read-only: it holds 110 MiB of its 100 MiB")
    assert "refuses connections" in Change("app_blog", 130 * MiB, 100, READ_ONLY,
                                           REFUSED).message()
