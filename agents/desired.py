"""A host's desired state as the API sends it (`GET /hosts/ID/desired`), turned into the
fleet values the agent's pure core already reasons over (agents/fleet.py): its own
placements and what it may know of their apps. Pure: a dict in, a Fleet out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from agents.fleet import App, Fleet, Placement, Release
from ledger.builds import Build


def fleet_of(snapshot: dict[str, Any]) -> Fleet:
    """The Fleet a host agent acts on: only its placements and their apps."""
    fleet = Fleet()
    for name, a in snapshot.get("apps", {}).items():
        app = App(name, a.get("current"), deployed=a.get("deployed"),
                  failed={int(n): r for n, r in a.get("failed", {}).items()}, uid=a.get("uid"))
        app.releases = {int(n): Release(int(n), r["digest"], r.get("procfile", {}),
                                        r.get("config_version", 0), app=name,
                                        build=_built(r.get("slug")))
                        for n, r in a.get("releases", {}).items()}
        app.configs = {0: {}, **{int(v): dict(c) for v, c in a.get("configs", {}).items()}}
        app.sizes = dict(a.get("sizes", {}))
        app.addons = tuple(a.get("addons", ()))
        fleet.apps[name] = app
    now = datetime.now(UTC)
    host = snapshot.get("host_id", "")
    for p in snapshot.get("placements", []):
        fleet.placements[p["instance_id"]] = Placement(
            p["instance_id"], p["app"], p["release"], p["process_type"], host, p["port"], now)
    fleet.position = snapshot.get("version", 0)
    return fleet


def _built(slug: str | None) -> Build:
    """A release the API says is built (its slug's digest), or one that is not yet."""
    return Build(status="succeeded", slug_digest=slug) if slug else Build()

