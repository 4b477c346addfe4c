"""Which releases await a build, as the API tells builders: pure, no I/O.

Builders hold no ledger credentials (DESIGN.md, "Trust boundaries"): they ask the API
what to build and claim through it. The API keeps `Unbuilt`, an incremental fold of the
`app-*` and `build-*` streams down to the releases with no build outcome yet (a handful,
whatever the size of the platform), and decides on each with its build stream's fold
(ledger/builds.py, the one every reader shares):

- a release is offered while it has no outcome and no live claim (a claim whose lease ran
  out, its builder dead, is offered again as the next attempt);
- a release whose bundle was built before for the same app (a config change, a rollback,
  a redeploy of the same code) is given that slug at its claim, without a build;
- newest releases first: they are the ones people wait for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from api.state import AppState, Release
from ledger.builds import Build
from ledger.events import RecordedEvent

CATEGORIES = ["app", "build"]
TYPES = ["AppDeleted", "ReleaseCreated", "BuildSucceeded", "BuildFailed"]


@dataclass
class Unbuilt:
    """Per app, the app-stream versions of its releases whose build has no outcome."""

    apps: dict[str, set[int]] = field(default_factory=dict)
    position: int = 0

    def apply(self, events: Iterable[RecordedEvent]) -> None:
        for e in events:
            app = e.data.get("app")
            if e.type == "ReleaseCreated" and app:
                self.apps.setdefault(app, set()).add(e.version)
            elif e.type == "AppDeleted":
                self.apps.pop(e.stream.removeprefix("app-"), None)
            elif e.type in ("BuildSucceeded", "BuildFailed") and app:
                version = e.stream.rpartition(".")[2]
                if version.isdigit():
                    self.apps.get(app, set()).discard(int(version))
            if e.position:
                self.position = max(self.position, e.position)

    def waiting(self) -> list[tuple[str, int]]:
        """(app, app-stream version) of every release without a build outcome."""
        return [(app, v) for app, versions in self.apps.items() for v in sorted(versions)]


def offered(state: AppState, builds: Mapping[int, Build], now: datetime) -> list[Release]:
    """The app's releases a builder may claim now (`builds`: release number -> its build),
    newest first."""
    out = [r for r in state.releases if r.number in builds and builds[r.number].claimable(now)]
    return sorted(out, key=lambda r: r.number, reverse=True)


def earlier_slug(state: AppState, release: Release,
                 builds: Mapping[int, Build]) -> tuple[int, Build] | None:
    """An earlier release of the same bundle with a slug, whose slug `release` takes
    (`builds`: the builds of the app's other releases that share its bundle)."""
    for other in sorted(state.releases, key=lambda r: r.number, reverse=True):
        b = builds.get(other.number)
        if (other.number != release.number and other.bundle_digest == release.bundle_digest
                and b is not None and b.status == "succeeded" and b.slug_digest):
            return other.number, b
    return None


def holds(build: Build, builder: str, attempt: int) -> bool:
    """Does `builder` hold the claim of `attempt`? (A lease that ran out is still held
    until another builder claims it: the same rule as an append at the stream's version.)"""
    return build.status == "building" and build.builder == builder and build.attempt == attempt
