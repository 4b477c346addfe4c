"""api/quotas.py: the quota in force, how a formation counts, and what is refused."""

from __future__ import annotations

import pytest

from api import quotas
from api.quotas import DEFAULTS, QuotaExceeded


def test_the_last_setting_is_the_whole_quota_and_none_is_the_default() -> None:
    first = quotas.setting("user", "ann", None, {"instances": 3, "memory_mb": 1024})
    second = quotas.setting("user", "ann", first, {"instances": None})
    assert quotas.fold("user", [first]).instances == 3
    assert quotas.fold("user", [first, second]) == DEFAULTS["user"].__class__(
        **{**DEFAULTS["user"].__dict__, "memory_mb": 1024})
    assert quotas.fold("app", []) == DEFAULTS["app"]


def test_usage_counts_instances_and_memory_by_size() -> None:
    assert quotas.usage({"web": 2, "worker": 1}, {"web": "standard-2x"}) == (3, 2 * 1024 + 512)


def _check(scale: dict[str, int], before: tuple[int, int] = (0, 0),
           others: tuple[int, int] = (0, 0), sizes: dict[str, str] | None = None) -> None:
    app_q = quotas.fold("app", [quotas.setting("app", "blog", None, {"instances": 5})])
    user_q = quotas.fold("user", [quotas.setting("user", "ann", None,
                                                 {"instances": 8, "memory_mb": 4096})])
    quotas.check_scale("blog", "ann", before, scale, sizes or {}, app_q, user_q, others)


def test_a_formation_past_a_quota_is_refused_naming_it() -> None:
    _check({"web": 5})
    with pytest.raises(QuotaExceeded, match="app blog may run 5 instances") as exc:
        _check({"web": 6})
    assert exc.value.extra == {"quota": "instances"} and exc.value.status == 422
    with pytest.raises(QuotaExceeded, match="user ann may run 8 instances"):
        _check({"web": 4}, others=(5, 0))
    with pytest.raises(QuotaExceeded, match="user ann may use 4096 MiB") as exc:
        _check({"web": 3}, sizes={"web": "standard-2x"}, others=(1, 1536))
    assert exc.value.extra == {"quota": "memory_mb"}


def test_asking_no_more_than_now_is_always_allowed() -> None:
    _check({"web": 6}, before=(7, 7 * 512))  # a quota lowered below what runs


def test_bundle_limits_take_the_smaller_quota_and_the_platform_cap() -> None:
    app_q = quotas.fold("app", [quotas.setting("app", "b", None, {"bundle_mb": 10,
                                                                  "unpacked_mb": 100})])
    assert quotas.bundle_limits(app_q, DEFAULTS["user"], 50 << 20) == (10 << 20, 100 << 20)
    assert quotas.bundle_limits(DEFAULTS["app"], DEFAULTS["user"], 50 << 20) == (
        50 << 20, 2048 << 20)
