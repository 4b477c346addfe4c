"""The placer's pure core: decisions from a folded fleet and an injected clock, no I/O."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from agents.fleet import Fleet
from agents.placement import Settings, decide
from ledger.events import RecordedEvent
from ledger.vocabulary import LIVENESS_STREAM

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DIGEST = "a" * 64
SLUG = "b" * 64


class World:
    """A fleet fed with events as the ledger would record them, and a clock."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.fleet = Fleet()
        self.now = T0
        self.settings = settings or Settings()
        self.versions: Counter = Counter()
        self.ids = itertools.count(1)
        self.decided: list[tuple[str, str, dict[str, Any]]] = []
        live = self.settings.liveness  # as announced by this placer's first round
        self.emit(LIVENESS_STREAM, "LivenessSet", ttl=live.ttl, suspect_after=live.suspect_after)

    def emit(self, stream: str, type_: str, **data: Any) -> None:
        self.versions[stream] += 1
        n = next(self.ids)
        self.fleet.apply(RecordedEvent(n, n, stream, self.versions[stream], type_, data, {},
                                       self.now))

    def tick(self, seconds: float = 0.0) -> list[tuple[str, str, dict[str, Any]]]:
        """Advance the clock, decide, and record the decisions as if appended."""
        self.now += timedelta(seconds=seconds)
        out = []
        for a in decide(self.fleet, self.now, self.settings,
                        new_id=lambda app, r, t: f"{app}.{r}.{t}.{next(self.ids)}"):
            assert a.expected_version == self.versions[a.stream]
            for e in a.events:
                self.emit(a.stream, e.type, **e.data)
                out.append((a.stream, e.type, e.data))
        self.decided += out
        return out

    def host(self, host_id: str, capacity: int = 10, port_min: int = 7000) -> None:
        self.emit(f"host-{host_id}", "HostRegistered", host_id=host_id, address="127.0.0.1",
                  port_min=port_min, port_max=port_min + 99, capacity=capacity)

    def beat(self, *hosts: str) -> None:
        for h in hosts:
            self.emit(f"heartbeat-{h}", "HostHeartbeat", host_id=h)

    def app(self, name: str, procfile: dict[str, str] | None = None, **scale: int) -> None:
        self.emit(f"app-{name}", "AppCreated", name=name, owner="ann")
        self.release(name, 1, procfile)
        if scale:
            self.emit(f"app-{name}", "ScaleChanged", app=name, scale=scale)

    def release(self, name: str, number: int, procfile: dict[str, str] | None = None,
                built: bool = True) -> None:
        self.emit(f"app-{name}", "ReleaseCreated", app=name, release=number,
                  bundle_digest=DIGEST, procfile=procfile or {"web": "gunicorn app:app"},
                  config_version=0)
        if built:
            self.built(name, number)

    def built(self, name: str, number: int) -> None:
        """What a builder appends once the release's slug is stored."""
        stream = self.fleet.apps[name].releases[number].build_stream
        self.emit(stream, "BuildStarted", app=name, release=number, builder="b1", lease_s=30)
        self.emit(stream, "BuildSucceeded", app=name, release=number, slug_digest=SLUG,
                  size_bytes=1000, seconds=1.0)

    def scale(self, name: str, **scale: int) -> None:
        self.emit(f"app-{name}", "ScaleChanged", app=name, scale=scale)

    def placed(self, app: str | None = None) -> dict[str, Any]:
        return {p.instance_id: p for p in self.fleet.placements.values()
                if app is None or p.app == app}

    def healthy(self, *instance_ids: str) -> None:
        for iid in instance_ids or list(self.placed()):
            host = self.fleet.placements[iid].host_id
            self.emit(f"instance-{iid}", "InstanceStarted", instance_id=iid, host_id=host,
                      pid=100)
            self.emit(f"instance-{iid}", "InstanceHealthy", instance_id=iid, host_id=host)

    def exited(self, iid: str, code: int, restarts: int = 0,
               log_tail: list[str] | None = None) -> None:
        self.emit(f"instance-{iid}", "InstanceExited", instance_id=iid,
                  host_id=self.fleet.placements[iid].host_id, exit_code=code,
                  restarts=restarts, log_tail=log_tail or ["boom"])

    def types(self, decided: list[tuple[str, str, dict[str, Any]]]) -> Counter:
        return Counter(t for _, t, _ in decided)


def test_instances_spread_over_hosts_within_their_port_ranges() -> None:
    w = World()
    w.host("h1", port_min=7000)
    w.host("h2", port_min=7100)
    w.app("blog", web=2)
    w.tick()
    hosts = sorted(p.host_id for p in w.placed().values())
    assert hosts == ["h1", "h2"]
    for p in w.placed().values():
        assert p.port == (7000 if p.host_id == "h1" else 7100)
    assert w.tick() == []  # converged: nothing more to say


def test_more_instances_than_hosts_still_spread_evenly_and_ports_differ() -> None:
    w = World()
    w.host("h1")
    w.host("h2", port_min=7100)
    w.app("blog", web=4)
    w.tick()
    assert Counter(p.host_id for p in w.placed().values()) == {"h1": 2, "h2": 2}
    assert len({(p.host_id, p.port) for p in w.placed().values()}) == 4


def test_capacity_is_respected_and_a_shortfall_is_reported_once() -> None:
    w = World()
    w.host("h1", capacity=1)
    w.host("h2", capacity=1, port_min=7100)
    w.app("blog", web=3)
    decided = w.tick()
    assert w.types(decided) == {"InstancePlaced": 2, "PlacementFailed": 1}
    failed = next(d for _, t, d in decided if t == "PlacementFailed")
    assert (failed["wanted"], failed["placed"]) == (3, 2)
    assert w.tick() == []  # no PlacementFailed spam while nothing changed
    w.host("h3", port_min=7200)
    w.beat("h3")
    assert w.types(w.tick()) == {"InstancePlaced": 1}


def test_never_places_on_a_suspect_or_lost_host() -> None:
    w = World(Settings(suspect_after=5, ttl=15))
    w.host("h1")
    w.host("h2", port_min=7100)
    w.now += timedelta(seconds=6)
    w.beat("h2")  # h1 missed two heartbeats: suspect
    w.app("blog", web=2)
    w.tick()
    assert {p.host_id for p in w.placed().values()} == {"h2"}


def test_a_host_silent_past_the_ttl_is_lost_and_its_instances_replaced() -> None:
    w = World(Settings(suspect_after=5, ttl=15))
    w.host("h1")
    w.host("h2", port_min=7100)
    w.app("blog", web=2)
    w.tick()
    w.healthy()
    w.tick()
    lost_ids = [i for i, p in w.placed().items() if p.host_id == "h1"]
    w.now += timedelta(seconds=10)
    w.beat("h2")
    assert w.tick() == []  # h1 is only suspect: it keeps its instance
    w.now += timedelta(seconds=6)
    w.beat("h2")
    decided = w.tick()
    assert ("host-h1", "HostLost") in [(s, t) for s, t, _ in decided]
    assert w.types(decided)["InstanceUnplaced"] == 1
    assert {p.host_id for p in w.placed().values()} == {"h2"}
    assert len(w.placed()) == 2 and lost_ids[0] not in w.placed()
    assert w.tick() == []  # HostLost once


def test_rolling_deploy_stops_the_old_release_only_once_the_new_is_healthy() -> None:
    w = World()
    w.host("h1")
    w.host("h2", port_min=7100)
    w.app("blog", web=2)
    w.tick()
    w.healthy()
    assert w.types(w.tick()) == {"ReleaseDeployed": 1}
    old = set(w.placed())
    w.release("blog", 2)
    assert w.types(w.tick()) == {"InstancePlaced": 2}
    new = set(w.placed()) - old
    assert {w.placed()[i].release for i in new} == {2} and old <= set(w.placed())
    w.healthy(next(iter(new)))
    assert w.tick() == []  # one of two healthy: old keeps serving
    w.healthy(*new)
    decided = w.tick()
    assert w.types(decided) == {"ReleaseDeployed": 1, "InstanceUnplaced": 2}
    assert set(w.placed()) == new


def test_a_crash_looping_release_fails_and_the_old_one_keeps_serving() -> None:
    w = World()
    w.host("h1")
    w.app("blog", web=1)
    w.tick()
    w.healthy()
    w.tick()
    (old,) = w.placed()
    w.release("blog", 2)
    w.tick()
    (new,) = set(w.placed()) - {old}
    for n in range(3):
        w.exited(new, 3, restarts=n + 1)
    decided = w.tick()
    failed = [d for _, t, d in decided if t == "ReleaseFailed"]
    assert failed and "crash-looping" in failed[0]["reason"]
    assert "exit code 3" in failed[0]["reason"]
    w.tick()
    assert set(w.placed()) == {old}
    assert w.tick() == []
    w.release("blog", 3)  # a rollback is a release like any other
    w.tick()
    (newer,) = set(w.placed()) - {old}
    w.healthy(newer)
    w.tick()
    assert set(w.placed()) == {newer}


def test_an_instance_that_never_starts_fails_the_release_with_the_agents_reason() -> None:
    w = World()
    w.host("h1")
    w.app("blog", web=1)
    w.tick()
    (iid,) = w.placed()
    for n in range(3):  # what an agent reports when it could not prepare or launch
        w.emit(f"instance-{iid}", "InstanceExited", instance_id=iid, host_id="h1",
               exit_code=None, signal=None, restarts=n + 1,
               log_tail=["cannot create user tally-blog with uid 200000: tally-x has it"])
    (reason,) = [d["reason"] for _, t, d in w.tick() if t == "ReleaseFailed"]
    assert "could not start (3 tries): cannot create user tally-blog" in reason, reason


def test_a_release_never_healthy_within_the_deadline_fails() -> None:
    w = World(Settings(deploy_timeout=60, ttl=1000, suspect_after=1000))
    w.host("h1")
    w.app("blog", web=1)
    w.tick()
    w.healthy()
    w.tick()
    w.release("blog", 2)
    w.tick()
    assert w.types(w.tick(59)) == Counter()
    assert w.types(w.tick(2)) == {"ReleaseFailed": 1}


def test_release_phase_runs_first_and_its_failure_keeps_the_old_release() -> None:
    procfile = {"web": "gunicorn app:app", "release": "python migrate.py"}
    w = World()
    w.host("h1")
    w.app("blog", procfile, web=1)
    assert [d["process_type"] for _, t, d in w.tick() if t == "InstancePlaced"] == ["release"]
    assert w.tick() == []  # nothing else until the release phase is done
    (phase,) = w.placed()
    w.exited(phase, 0)
    decided = w.tick()
    assert w.types(decided) == {"InstanceUnplaced": 1, "InstancePlaced": 1}
    w.healthy()
    w.tick()
    (web1,) = w.placed()
    w.release("blog", 2, procfile)
    w.tick()
    (phase2,) = set(w.placed()) - {web1}
    lines = [f"migration step {i}" for i in range(150)]
    w.exited(phase2, 1, log_tail=lines)
    decided = w.tick()
    failed = next(d for _, t, d in decided if t == "ReleaseFailed")
    assert "release phase exited with code 1" in failed["reason"]
    assert failed["output"] == lines[-100:], "its output, enough to debug it"
    assert set(w.placed()) == {web1}
    assert w.tick() == []


def test_scale_down_withdraws_unhealthy_first_and_zero_withdraws_all() -> None:
    w = World()
    w.host("h1")
    w.host("h2", port_min=7100)
    w.app("blog", web=3)
    w.tick()
    ids = sorted(w.placed())
    w.healthy(*ids[:2])
    w.scale("blog", web=2)
    w.tick()
    assert sorted(w.placed()) == ids[:2]
    w.scale("blog", web=0)
    w.tick()
    assert w.placed() == {}


def test_a_deleted_app_is_withdrawn_everywhere() -> None:
    w = World()
    w.host("h1")
    w.app("blog", web=2)
    w.tick()
    w.emit("app-blog", "AppDeleted", name="blog")
    assert w.types(w.tick()) == {"InstanceUnplaced": 2}


def test_the_fold_keeps_config_versions_and_revives_a_lost_host_on_a_heartbeat() -> None:
    w = World()
    w.emit("app-blog", "AppCreated", name="blog", owner="ann")
    w.emit("app-blog", "ConfigChanged", app="blog", set={"A": "1", "B": "2"}, unset=[],
           config_version=1)
    w.emit("app-blog", "ConfigChanged", app="blog", set={"A": "3"}, unset=["B"],
           config_version=2)
    app = w.fleet.apps["blog"]
    assert (app.config_at(0), app.config_at(1), app.config_at(2)) == (
        {}, {"A": "1", "B": "2"}, {"A": "3"})
    w.host("h1")
    w.emit("host-h1", "HostLost", host_id="h1", reason="silent")
    assert w.fleet.hosts["h1"].lost and w.fleet.hosts["h1"].version == 2
    w.beat("h1")
    assert not w.fleet.hosts["h1"].lost


def test_a_release_phase_with_no_host_to_run_on_is_reported_once() -> None:
    w = World()
    w.host("h1", capacity=0)
    w.app("blog", {"web": "gunicorn app:app", "release": "python migrate.py"}, web=1)
    decided = w.tick()
    assert [(t, d["process_type"]) for _, t, d in decided] == [("PlacementFailed", "release")]
    assert w.tick() == []
