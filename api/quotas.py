"""Quotas: how much of the fleet one user (all their apps together) and one app may take,
set by an admin (QuotaSet events in `quota-user:<name>` / `quota-app:<name>`), checked by
the API before it appends: a scale past the quota, or a bundle past its size, is refused
with a 422 naming the quota, so no one tenant fills every host.

Pure: the quotas and the usage are values; the routes (api/routes_quotas.py) read them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from api.errors import ApiError
from ledger.sizes import size_of

SUBJECTS = ("user", "app")
LIMITS = ("instances", "memory_mb", "bundle_mb", "slug_mb", "unpacked_mb", "database_mb")


@dataclass(frozen=True)
class Quota:
    instances: int
    """Instances running at once (every process type), and apart from them as many
    one-off runs going at once (api/runs.py)."""
    memory_mb: int
    """The sum of the instances' memory sizes (ledger/sizes.py)."""
    bundle_mb: int
    """A bundle upload, compressed (also capped by TALLY_MAX_BUNDLE_MB)."""
    slug_mb: int
    """A built slug, compressed (the builder checks it)."""
    unpacked_mb: int
    """What one bundle or slug may unpack to (at most 2 GiB: ledger/archives.py)."""
    database_mb: int = 1024
    """One PostgreSQL add-on database's size; past it read-only, then refused
    (agents/dbsize.py, `tally serve addons`)."""


DEFAULTS = {
    "user": Quota(instances=100, memory_mb=51_200, bundle_mb=500, slug_mb=500,
                  unpacked_mb=2048, database_mb=10_240),
    "app": Quota(instances=50, memory_mb=25_600, bundle_mb=500, slug_mb=500,
                 unpacked_mb=2048, database_mb=10_240),
}
"""What applies until an admin says otherwise (Heroku: 100 dynos an app, 500 MB slugs)."""


class QuotaExceeded(ApiError):
    status, code = 422, "quota_exceeded"


def stream(subject: str, name: str) -> str:
    return f"quota-{subject}:{name}"


def fold(subject: str, events: Iterable[Mapping[str, Any]]) -> Quota:
    """The quota in force after a stream's QuotaSet payloads (the last one holds them all;
    a None limit is the default)."""
    quota = DEFAULTS[subject]
    for data in events:
        quota = replace(DEFAULTS[subject], **{k: data[k] for k in LIMITS
                                              if data.get(k) is not None})
    return quota


def setting(subject: str, name: str, before: Mapping[str, Any] | None,
            changes: Mapping[str, Any]) -> dict[str, Any]:
    """The QuotaSet payload that applies `changes` (a limit to None: back to the default)
    to the limits set `before` (the last payload, or None)."""
    limits = {k: (before or {}).get(k) for k in LIMITS}
    limits.update({k: v for k, v in changes.items() if k in LIMITS})
    return {"subject": subject, "name": name, **limits}


def usage(scale: Mapping[str, int], sizes: Mapping[str, str]) -> tuple[int, int]:
    """(instances, memory MiB) a formation asks for."""
    instances = sum(scale.values())
    memory = sum(n * size_of(sizes.get(t)).memory_mb for t, n in scale.items())
    return instances, memory


def check_scale(app: str, owner: str, before: tuple[int, int], scale: Mapping[str, int],
                sizes: Mapping[str, str], app_quota: Quota, user_quota: Quota,
                others: tuple[int, int]) -> None:
    """Refuse the app's new formation if it passes the app's quota, or the owner's with the
    owner's other apps (`others`: their instances and memory). A formation that asks no
    more than `before` (the app's usage now) is always allowed: a quota lowered below what
    runs must not stop anyone scaling down."""
    instances, memory = usage(scale, sizes)
    if instances <= before[0] and memory <= before[1]:
        return
    for who, quota, used in ((f"app {app}", app_quota, (0, 0)),
                             (f"user {owner}", user_quota, others)):
        if used[0] + instances > quota.instances:
            raise QuotaExceeded(
                f"quota exceeded: {who} may run {quota.instances} instances "
                f"(asked: {used[0] + instances}); an admin can raise it with "
                "`tally admin quota`", {"scale": ["instances quota"]}, quota="instances")
        if used[1] + memory > quota.memory_mb:
            raise QuotaExceeded(
                f"quota exceeded: {who} may use {quota.memory_mb} MiB of memory "
                f"(asked: {used[1] + memory} MiB); an admin can raise it with "
                "`tally admin quota`", {"scale": ["memory_mb quota"]}, quota="memory_mb")


def bundle_limits(app_quota: Quota, user_quota: Quota, platform_max: int) -> tuple[int, int]:
    """(largest upload, largest unpacked size) in bytes for the app's next bundle."""
    upload = min(app_quota.bundle_mb, user_quota.bundle_mb) * 2**20
    return min(upload, platform_max), min(app_quota.unpacked_mb, user_quota.unpacked_mb) * 2**20


def database_mb(app_quota: Quota, user_quota: Quota) -> int:
    """The most one of the app's add-on databases may hold, in MiB."""
    return min(app_quota.database_mb, user_quota.database_mb)


def as_dict(subject: str, name: str, quota: Quota, used: tuple[int, int]) -> dict[str, Any]:
    return {"subject": subject, "name": name, "limits": asdict(quota),
            "used": {"instances": used[0], "memory_mb": used[1]}}
