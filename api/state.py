"""An app's current state, folded from its `app-<name>` stream: the pure core every
command handler decides on. No I/O here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from ledger.events import RecordedEvent
from ledger.rules import (
    ADDON_DROP_EVENTS,
    config_after,
    domains_after,
    members_after,
    undropped_after,
)
from ledger.vocabulary import fold_scale


@dataclass(frozen=True)
class Release:
    number: int
    bundle_digest: str
    procfile: dict[str, str]
    config_version: int
    description: str
    rollback_of: int | None
    created_at: str | None
    created_by: str | None
    stream_version: int = 0
    """The app stream's version at its ReleaseCreated: names its build stream."""


@dataclass(frozen=True)
class Run:
    """A one-off command started in the app (RunStarted), and how it ended (RunEnded)."""

    number: int
    run_id: str
    command: tuple[str, ...]
    host_id: str
    release: int
    detached: bool
    actor: str | None
    started_at: str | None
    ended: bool = False
    exit_code: int | None = None


@dataclass(frozen=True)
class Addon:
    """An add-on the app reaches through a config var: its own (AddonCreated) or another
    app's of the same owner (AddonAttached)."""

    name: str
    kind: str
    plan: str
    config_var: str
    owner: str
    """The app that owns it (this app, or the one it was attached from)."""
    where: str = ""


@dataclass(frozen=True)
class Cert:
    """A certificate the app has (CertificateAdded/Issued/Renewed until removed or renewed);
    its key stays in the ledger, sealed."""

    cert_id: str
    hostnames: tuple[str, ...]
    not_after: str
    source: str
    """manual (certs:add) or acme."""
    added_at: str | None


CERTIFICATE_EVENTS = ("CertificateAdded", "CertificateIssued", "CertificateRenewed")

RUN_EVENTS = ("RunStarted", "RunEnded")
"""Recorded in the app's stream but no change of what the app is: they do not move
`updated_at`, so a request that raced one is decided again rather than refused."""


@dataclass(frozen=True)
class AppState:
    """What the app's stream says now. `version` is the stream version it was folded at:
    the expected_version for the next append."""

    name: str
    version: int = 0
    exists: bool = False
    deleted: bool = False
    owner: str | None = None
    uid: int | None = None
    """The Unix uid its processes run as (AppCreated; None in older events)."""
    members: frozenset[str] = frozenset()
    created_at: str | None = None
    releases: tuple[Release, ...] = ()
    configs: dict[int, dict[str, str]] = field(default_factory=lambda: {0: {}})
    config_version: int = 0
    scale: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, str] = field(default_factory=dict)
    """Formation size per process type (ledger/sizes.py); absent: the default."""
    domains: tuple[str, ...] = ()
    maintenance: bool = False
    updated_at: datetime | None = None
    """When the last event folded in was recorded (the ledger's clock)."""
    runs: tuple[Run, ...] = ()
    addons: tuple[Addon, ...] = ()
    undropped: dict[str, str] = field(default_factory=dict)
    """Its add-ons destroyed whose service may still exist (name -> kind): a drop that
    failed, retried by the add-ons' reaper; kept across a delete and re-create (the new
    app's add-on would take the same database or Redis)."""
    certificates: tuple[Cert, ...] = ()

    @property
    def config(self) -> dict[str, str]:
        return self.configs[self.config_version]

    @property
    def current(self) -> Release | None:
        return self.releases[-1] if self.releases else None

    def release(self, number: int) -> Release | None:
        return next((r for r in self.releases if r.number == number), None)

    def run(self, number: int) -> Run | None:
        return next((r for r in self.runs if r.number == number), None)

    def addon(self, name: str) -> Addon | None:
        return next((a for a in self.addons if a.name == name), None)

    def may_manage(self, user: str) -> bool:
        return user == self.owner or user in self.members


def fold(name: str, events: Iterable[RecordedEvent],
         state: AppState | None = None) -> AppState:
    """Apply the stream's events in order, from scratch or onto an earlier `state` (the
    events must follow its version). An AppCreated after an AppDeleted starts the app
    afresh (the old history stays in the stream)."""
    state = state or AppState(name)
    for ev in events:
        at = state.updated_at if ev.type in RUN_EVENTS else ev.recorded_at
        state = replace(apply(state, ev), version=ev.version, updated_at=at)
    return state


def apply(s: AppState, ev: RecordedEvent) -> AppState:
    d: dict[str, Any] = ev.data
    at = ev.recorded_at.isoformat() if ev.recorded_at else None
    t = ev.type
    if t == "AppCreated":
        return AppState(s.name, exists=True, owner=d["owner"], uid=d.get("uid"), created_at=at,
                        undropped=s.undropped)
    if t == "AppDeleted":
        return replace(s, exists=False, deleted=True, scale={k: 0 for k in s.scale})
    if t == "ConfigChanged":
        version = d["config_version"]
        return replace(s, configs={**s.configs, version: config_after(s.config, d)},
                       config_version=version)
    if t == "ReleaseCreated":
        rel = Release(d["release"], d["bundle_digest"], dict(d["procfile"]),
                      d["config_version"], d.get("description", ""), d.get("rollback_of"),
                      at, ev.metadata.get("actor"), ev.version)
        return replace(s, releases=(*s.releases, rel))
    if t == "ScaleChanged":
        return replace(s, scale=fold_scale(s.scale, d["scale"]), sizes=dict(d.get("sizes", {})))
    if t in ("DomainAdded", "DomainRemoved"):
        return replace(s, domains=tuple(domains_after(s.domains, t, d["domain"])))
    if t == "MaintenanceChanged":
        return replace(s, maintenance=d["enabled"])
    if t in ("AppMemberAdded", "AppMemberRemoved"):
        return replace(s, members=members_after(s.members, t, d["user"]))
    if t in CERTIFICATE_EVENTS:
        gone = {d["cert_id"], d.get("renews")}
        cert = Cert(d["cert_id"], tuple(d["hostnames"]), d["not_after"],
                    "manual" if t == "CertificateAdded" else "acme", at)
        return replace(s, certificates=(*(c for c in s.certificates if c.cert_id not in gone),
                                        cert))
    if t == "CertificateRemoved":
        return replace(s, certificates=tuple(c for c in s.certificates
                                             if c.cert_id != d["cert_id"]))
    if t == "RunStarted":
        run = Run(d["number"], d["run_id"], tuple(d["command"]), d["host_id"], d["release"],
                  d.get("detached", False), ev.metadata.get("actor"), at)
        return replace(s, runs=(*s.runs, run))
    if t in ADDON_DROP_EVENTS:
        s = replace(s, undropped=undropped_after(s.undropped, t, d))
    if t in ("AddonCreated", "AddonAttached"):
        addon = Addon(d["addon"], d["kind"], d.get("plan", ""), d["config_var"],
                      d.get("owner", s.name), d.get("where", ""))
        return replace(s, addons=(*s.addons, addon))
    if t in ("AddonDetached", "AddonDestroyed"):
        return replace(s, addons=tuple(a for a in s.addons if a.name != d["addon"]))
    if t == "RunEnded":
        return replace(s, runs=tuple(replace(r, ended=True, exit_code=d.get("exit_code"))
                                     if r.run_id == d["run_id"] else r for r in s.runs))
    return s


def summary(s: AppState) -> dict[str, Any]:
    """The app as `GET /apps/<name>` shows it (config values are not in it)."""
    cur = s.current
    return {
        "name": s.name, "owner": s.owner, "members": sorted(s.members),
        "created_at": s.created_at, "release": cur.number if cur else None,
        "process_types": sorted(cur.procfile) if cur else [],
        "scale": s.scale, "sizes": s.sizes, "domains": list(s.domains),
        "maintenance": s.maintenance,
        "config_version": s.config_version, "version": s.version,
    }


def release_dict(r: Release) -> dict[str, Any]:
    return {
        "number": r.number, "bundle_digest": r.bundle_digest, "procfile": r.procfile,
        "config_version": r.config_version, "description": r.description,
        "rollback_of": r.rollback_of, "created_at": r.created_at, "created_by": r.created_by,
    }
