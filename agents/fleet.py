"""The fleet as the placer and the host agents need it, folded from the ledger's events.

Why a fold of its own rather than the views: a controller appends with the expected
version of the stream it decided from (`placement-<app>`, `host-<id>`), and only a fold
knows those versions at exactly the position it read. It is also self-sufficient: the
placer keeps placing while the projectors are rebuilding. The fold is pure (events in,
values out) and incremental: callers apply what follows their checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ledger import builds
from ledger.events import RecordedEvent
from ledger.rules import (
    HOST_LOST_AFTER,
    OBSERVED,
    ROLLOUT_EVENTS,
    config_after,
    instance_kept,
    rollout_after,
)
from ledger.vocabulary import (
    LIVENESS_STREAM,
    RELEASE_PHASE,
    HostState,
    InstanceState,
    Liveness,
    fold_scale,
    host_state,
)

CATEGORIES = ["app", "build", "host", "heartbeat", "placement", "instance", "placer"]
"""The stream categories the fold reads."""


@dataclass
class Release:
    release: int
    digest: str
    """The bundle's digest (the code as uploaded)."""
    procfile: dict[str, str]
    config_version: int
    app_version: int = 0
    """Version of the app's stream at its ReleaseCreated: names its build stream."""
    app: str = ""
    build: builds.Build = field(default_factory=builds.Build)

    @property
    def slug(self) -> str | None:
        """The slug's digest once built; a release is placed only then."""
        return self.build.slug_digest if self.build.status == "succeeded" else None

    @property
    def build_stream(self) -> str:
        return builds.build_stream(self.app, self.app_version)


@dataclass
class App:
    name: str
    current_release: int | None = None
    scale: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, str] = field(default_factory=dict)
    """Formation size per process type (ledger/sizes.py); absent: the default."""
    releases: dict[int, Release] = field(default_factory=dict)
    configs: dict[int, dict[str, str]] = field(default_factory=lambda: {0: {}})
    """Config vars per config version (ConfigChanged, ledger.rules.config_after)."""
    deployed: int | None = None
    """The last release whose rollout completed (ReleaseDeployed)."""
    failed: dict[int, str] = field(default_factory=dict)
    """Releases declared failed (ReleaseFailed), with the reason."""
    phase_ok: set[int] = field(default_factory=set)
    """Releases whose release phase exited 0."""
    last_failure: dict[tuple[int, str], tuple[int, int, str]] = field(default_factory=dict)
    uid: int | None = None
    """The Unix uid its processes run as (AppCreated; None in older events)."""
    addons: tuple[str, ...] = ()
    """Where its add-ons run (host:port), its own and those attached to it, as the API
    reads them from the ledger: the only add-on ports it may reach (agents/netrules.py)."""

    def config_at(self, version: int) -> dict[str, str]:
        """Config vars as of `version` (the one a release was cut with)."""
        return dict(self.configs[max(v for v in self.configs if v <= version)])


@dataclass
class Host:
    host_id: str
    address: str
    port_min: int
    port_max: int
    capacity: int
    registered_at: datetime
    last_heartbeat: datetime | None = None
    lost: bool = False
    version: int = 0
    """Version of the host-<id> stream (HostLost is appended with it as expected version)."""
    run_endpoint: str = ""

    def state(self, now: datetime, liveness: Liveness) -> HostState:
        return host_state(self.lost, self.last_heartbeat or self.registered_at, now, liveness)


@dataclass(frozen=True)
class Placement:
    instance_id: str
    app: str
    release: int
    process_type: str
    host_id: str
    port: int
    placed_at: datetime


@dataclass
class Instance:
    """What agents reported about one instance."""

    state: InstanceState = InstanceState.PLACED
    host_id: str | None = None
    port: int | None = None
    restarts: int = 0
    exit_code: int | None = None
    signal: int | None = None
    log_tail: list[str] = field(default_factory=list)


@dataclass
class Fleet:
    apps: dict[str, App] = field(default_factory=dict)
    hosts: dict[str, Host] = field(default_factory=dict)
    placements: dict[str, Placement] = field(default_factory=dict)
    instances: dict[str, Instance] = field(default_factory=dict)
    placement_versions: dict[str, int] = field(default_factory=dict)
    liveness: Liveness = Liveness()
    """The timings the placer last announced (LivenessSet); the defaults before that."""
    liveness_version: int = 0
    position: int = 0
    last_id: int = 0
    """The highest event id folded (heartbeats read without theirs aside)."""

    def apply_all(self, events: list[RecordedEvent]) -> None:
        for e in events:
            self.apply(e)

    def apply(self, e: RecordedEvent) -> None:
        handler = HANDLERS.get(e.type)
        if handler is not None:
            handler(self, e.data, e)
        if e.stream.startswith("placement-"):
            self.placement_versions[e.stream.removeprefix("placement-")] = e.version
        if e.position:
            self.position = max(self.position, e.position)
        if e.id > self.last_id:
            self.last_id = e.id

    def placements_of(self, app: str) -> list[Placement]:
        return [p for p in self.placements.values() if p.app == app]

    def instance(self, instance_id: str) -> Instance:
        return self.instances.get(instance_id) or Instance()


def _app_created(f: Fleet, d: dict[str, Any], e: RecordedEvent) -> None:
    f.apps[d["name"]] = App(d["name"], uid=d.get("uid"))


def _app_deleted(f: Fleet, d: dict[str, Any], e: RecordedEvent) -> None:
    f.apps.pop(d["name"], None)


def _config_changed(f: Fleet, d: dict[str, Any], e: RecordedEvent) -> None:
    if app := f.apps.get(d["app"]):
        app.configs[d["config_version"]] = config_after(app.configs[max(app.configs)], d)


def _release_created(f: Fleet, d: dict[str, Any], e: RecordedEvent) -> None:
    if app := f.apps.get(d["app"]):
        app.releases[d["release"]] = Release(d["release"], d["bundle_digest"], d["procfile"],
                                             d["config_version"], e.version, d["app"])
        app.current_release = d["release"]


def _build(f: Fleet, d: dict[str, Any], e: RecordedEvent) -> None:
    app = f.apps.get(d["app"])
    release = app.releases.get(d["release"]) if app else None
    if release is not None and e.stream == release.build_stream:  # not an older app's
        release.build = builds.apply(release.build, e)


def _scale_changed(f: Fleet, d: dict[str, Any], e: RecordedEvent) -> None:
    if app := f.apps.get(d["app"]):
        app.scale = fold_scale(app.scale, d["scale"])
        app.sizes = dict(d.get("sizes", {}))


def _host_registered(f: Fleet, d: dict[str, Any], e: RecordedEvent) -> None:
    old = f.hosts.get(d["host_id"])
    f.hosts[d["host_id"]] = Host(d["host_id"], d["address"], d["port_min"], d["port_max"],
                                 d["capacity"], e.recorded_at,
                                 old.last_heartbeat if old else None, HOST_LOST_AFTER[e.type],
                                 e.version,
                                 d.get("run_endpoint", ""))


def _heartbeat(f: Fleet, d: dict[str, Any], e: RecordedEvent) -> None:
    if host := f.hosts.get(d["host_id"]):
        host.last_heartbeat = e.recorded_at
        host.lost = HOST_LOST_AFTER[e.type]


def _host_lost(f: Fleet, d: dict[str, Any], e: RecordedEvent) -> None:
    if host := f.hosts.get(d["host_id"]):
        host.lost = HOST_LOST_AFTER[e.type]
        host.version = e.version


def _placed(f: Fleet, d: dict[str, Any], e: RecordedEvent) -> None:
    f.placements[d["instance_id"]] = Placement(d["instance_id"], d["app"], d["release"],
                                               d["process_type"], d["host_id"], d["port"],
                                               e.recorded_at)
    f.instances.setdefault(d["instance_id"], Instance(host_id=d["host_id"], port=d["port"]))


def _unplaced(f: Fleet, d: dict[str, Any], e: RecordedEvent) -> None:
    f.placements.pop(d["instance_id"], None)
    inst = f.instances.get(d["instance_id"])
    if inst is not None and not instance_kept(False, inst.state):
        del f.instances[d["instance_id"]]


def _liveness_set(f: Fleet, d: dict[str, Any], e: RecordedEvent) -> None:
    if e.stream == LIVENESS_STREAM:
        f.liveness = Liveness(d["ttl"], d["suspect_after"])
        f.liveness_version = e.version


def _observed(state: InstanceState) -> Any:
    def handle(f: Fleet, d: dict[str, Any], e: RecordedEvent) -> None:
        iid = d["instance_id"]
        placed = f.placements.get(iid)
        if not instance_kept(placed is not None, state):
            f.instances.pop(iid, None)
            return
        inst = f.instances.setdefault(iid, Instance())
        inst.state = state
        inst.host_id = d.get("host_id") or inst.host_id
        if state is InstanceState.EXITED:
            inst.exit_code, inst.signal = d.get("exit_code"), d.get("signal")
            inst.restarts = d.get("restarts", 0)
            inst.log_tail = d.get("log_tail", [])
            app = f.apps.get(placed.app) if placed else None
            if app and placed and placed.process_type == RELEASE_PHASE and inst.exit_code == 0:
                app.phase_ok.add(placed.release)

    return handle


def _rollout(f: Fleet, d: dict[str, Any], e: RecordedEvent) -> None:
    if app := f.apps.get(d["app"]):
        app.deployed, app.failed = rollout_after(app.deployed, app.failed, e.type, d)


def _placement_failed(f: Fleet, d: dict[str, Any], e: RecordedEvent) -> None:
    if app := f.apps.get(d["app"]):
        app.last_failure[(d["release"], d["process_type"])] = (d["wanted"], d["placed"],
                                                              d["reason"])


HANDLERS = {
    "AppCreated": _app_created, "AppDeleted": _app_deleted, "ConfigChanged": _config_changed,
    "ReleaseCreated": _release_created, "ScaleChanged": _scale_changed,
    "HostRegistered": _host_registered, "HostHeartbeat": _heartbeat, "HostLost": _host_lost,
    "InstancePlaced": _placed, "InstanceUnplaced": _unplaced,
    **{name: _observed(state) for name, state in OBSERVED.items()},
    **dict.fromkeys(ROLLOUT_EVENTS, _rollout),
    "PlacementFailed": _placement_failed, "LivenessSet": _liveness_set,
    **{name: _build for name in builds.BUILD_EVENTS},
}
