"""One release's build as its stream tells it, for everyone who asks (builders, the placer,
host agents, the API): one fold, so they never disagree on whether a release is built.

Streams are `build-<app>.<v>`, `v` the version of the app's stream at its ReleaseCreated:
release numbers start again when a deleted app is created anew, stream versions never do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from ledger.events import RecordedEvent

BUILD_EVENTS = ("BuildStarted", "BuildClaimRenewed", "BuildSucceeded", "BuildFailed")


def build_stream(app: str, app_version: int) -> str:
    return f"build-{app}.{app_version}"


@dataclass(frozen=True)
class Build:
    version: int = 0
    """The stream's version: what the next append expects."""
    status: str = "pending"
    """pending | building | succeeded | failed"""
    builder: str = ""
    attempt: int = 0
    claimed_until: datetime | None = None
    slug_digest: str | None = None
    size_bytes: int = 0
    seconds: float = 0.0
    reason: str = ""
    log_tail: tuple[str, ...] = ()
    reused_from: int | None = None
    started_at: datetime | None = None
    lease_s: float = 0.0

    def claimable(self, now: datetime) -> bool:
        """No outcome yet and no live claim (never claimed, or its lease ran out)."""
        if self.status in ("succeeded", "failed"):
            return False
        return self.claimed_until is None or now >= self.claimed_until


def apply(b: Build, e: RecordedEvent) -> Build:
    d = e.data
    b = replace(b, version=e.version)
    if e.type == "BuildStarted":
        return replace(b, status="building", builder=d["builder"], lease_s=d["lease_s"],
                       attempt=d.get("attempt", 1), started_at=e.recorded_at,
                       claimed_until=e.recorded_at + timedelta(seconds=d["lease_s"]))
    if e.type == "BuildClaimRenewed" and b.status == "building":
        return replace(b, claimed_until=e.recorded_at + timedelta(seconds=b.lease_s))
    if e.type == "BuildSucceeded":
        return replace(b, status="succeeded", slug_digest=d["slug_digest"],
                       size_bytes=d["size_bytes"], seconds=d["seconds"],
                       reused_from=d.get("reused_from"), claimed_until=None)
    if e.type == "BuildFailed":
        return replace(b, status="failed", reason=d["reason"],
                       log_tail=tuple(d.get("log_tail", [])), seconds=d.get("seconds", 0.0),
                       claimed_until=None)
    return b


def fold(events: Iterable[RecordedEvent], build: Build | None = None) -> Build:
    b = build or Build()
    for e in events:
        b = apply(b, e)
    return b
