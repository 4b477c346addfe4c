"""The builders' decisions: which releases to build or to give an earlier slug, from the fleet
fold and `now`. Pure: the daemon (agents/builder.py) claims, builds and appends.

- a release is built once: it is offered only while its build stream has no outcome and no
  live claim (a claim whose lease ran out, its builder dead, is offered again);
- a release whose bundle was built before for the same app (a config change, a rollback, a
  redeploy of the same code) gets that slug at once, without a build, as on Heroku;
- newest releases first: they are the ones people wait for.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from agents.fleet import App, Fleet, Release


@dataclass(frozen=True)
class Job:
    app: str
    release: int
    stream: str
    expected_version: int
    bundle_digest: str
    config: tuple[tuple[str, str], ...]
    attempt: int
    reuse: Release | None = None
    app_uid: int | None = None
    """The app's uid (AppCreated): its builds run as ledger.uids.build_uid of it."""
    """An earlier release of the same bundle whose slug this one takes."""


def jobs(fleet: Fleet, now: datetime) -> list[Job]:
    out = []
    for app in fleet.apps.values():
        for number in sorted(app.releases, reverse=True):
            r = app.releases[number]
            if not r.build.claimable(now):
                continue
            out.append(Job(app.name, number, r.build_stream, r.build.version, r.digest,
                           tuple(sorted(app.config_at(r.config_version).items())),
                           r.build.attempt + 1, _built_before(app, r), app.uid))
    return out


def _built_before(app: App, release: Release) -> Release | None:
    for number in sorted(app.releases, reverse=True):
        other = app.releases[number]
        if other.digest == release.digest and other.slug is not None:
            return other
    return None
