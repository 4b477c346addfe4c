"""App uids: handed out in order from a range, each once."""

from __future__ import annotations

import pytest

from ledger.uids import NoUidLeft, next_uid


def test_the_first_uid_then_the_one_after_the_last() -> None:
    assert next_uid(None, 200_000, 200_002) == 200_000
    assert next_uid(200_000, 200_000, 200_002) == 200_001


def test_the_range_full() -> None:
    with pytest.raises(NoUidLeft, match="TALLY_APP_UIDS"):
        next_uid(200_002, 200_000, 200_002)


def test_app_users_are_named_with_the_platforms_prefix_within_32_characters() -> None:
    from agents.users import user_name

    assert user_name("blog") == "tally-blog"
    assert user_name("blog", "ts0a1b2-") == "ts0a1b2-blog"
    long = "a-very-long-app-name-of-thirty-chars"
    for prefix in ("tally-", "ts0a1b2-", "p" * 15):
        name = user_name(long, prefix)
        assert name.startswith(prefix) and len(name) <= 32
        assert name != user_name(long + "x", prefix), "the hash keeps long names apart"


def test_a_user_prefix_that_is_no_user_name_is_refused() -> None:
    from tally.config import Config

    assert Config.from_env({"TALLY_APP_USER_PREFIX": "ts1-"}).app_user_prefix == "ts1-"
    assert Config.from_env({}).app_user_prefix == "tally-"
    for bad in ("Tally-", "-x", "a" * 16, "x y", ""):
        with pytest.raises(ValueError, match="TALLY_APP_USER_PREFIX"):
            Config.from_env({"TALLY_APP_USER_PREFIX": bad})
