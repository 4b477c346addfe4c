"""`why`'s reasoning, situation by situation, over events validated by the catalogue.

The same scenarios run through a real ledger in tests/integration/test_projectors_why.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ledger.catalogue import stream_category
from ledger.events import NewEvent, RecordedEvent
from ledger.payloads import validate_event
from projectors.why import explain

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
DIGEST = "ab" * 32


@dataclass
class History:
    """Builds an app's story as (stream, event) appends, in order."""

    app: str
    appends: list[tuple[str, NewEvent]] = field(default_factory=list)

    def add(self, stream: str, type_: str, **data: Any) -> History:
        self.appends.append((stream, NewEvent(type_, data)))
        return self

    def domain(self, app: str, domain: str) -> History:
        """A domain as the API adds it: the claim, then the app's DomainAdded."""
        stream = f"domain-{domain}".replace("domain-*.", "domain-wildcard:")
        self.add(stream, "DomainClaimed", domain=domain, app=app)
        return self.add(f"app-{app}", "DomainAdded", app=app, domain=domain)

    def host(self, h: str, capacity: int = 4) -> History:
        return self.add(f"host-{h}", "HostRegistered", host_id=h, address=f"10.1.0.{len(h)}",
                        port_min=9000, port_max=9999, capacity=capacity)

    def heartbeat(self, h: str, instances: int = 0) -> History:
        return self.add(f"heartbeat-{h}", "HostHeartbeat", host_id=h, instances=instances)

    def created(self) -> History:
        return self.add(f"app-{self.app}", "AppCreated", name=self.app, owner="ann")

    def released(self, n: int = 1, procfile: dict[str, str] | None = None) -> History:
        return self.add(f"app-{self.app}", "ReleaseCreated", app=self.app, release=n,
                        bundle_digest=DIGEST, procfile=procfile or {"web": "gunicorn app"},
                        config_version=0)

    def scaled(self, web: int) -> History:
        return self.add(f"app-{self.app}", "ScaleChanged", app=self.app, scale={"web": web})

    def placed(self, iid: str, h: str, port: int = 9001, release: int = 1) -> History:
        return self.add(f"placement-{self.app}", "InstancePlaced", instance_id=iid,
                        app=self.app, release=release, process_type="web", host_id=h,
                        port=port)

    def instance(self, type_: str, iid: str, h: str, **data: Any) -> History:
        return self.add(f"instance-{iid}", type_, instance_id=iid, host_id=h, **data)

    def running(self, app_hosts: str) -> History:
        """A created, released, scaled app with one healthy instance on a fresh host."""
        h, iid = f"{app_hosts}-h1", f"{self.app}-i1"
        return (self.host(h).created().released().scaled(1).placed(iid, h)
                .instance("InstanceStarted", iid, h, pid=42)
                .instance("InstanceHealthy", iid, h).heartbeat(h, instances=1))


def recorded(appends: list[tuple[str, NewEvent]]) -> list[RecordedEvent]:
    """Validate like the ledger does, and number them like the sequencer does."""
    out, versions = [], {}
    for position, (stream, ev) in enumerate(appends, start=1):
        validate_event(stream_category(stream), ev.type, ev.data)
        versions[stream] = versions.get(stream, 0) + 1
        out.append(RecordedEvent(position, position, stream, versions[stream], ev.type, ev.data,
                                 {}, T0 + timedelta(milliseconds=position)))
    return out


def _crash_loop(h: History) -> None:
    iid, host = f"{h.app}-i1", f"{h.app}-h1"
    h.host(host).created().released().scaled(1).placed(iid, host)
    for restarts in range(4):
        h.instance("InstanceStarted", iid, host, pid=100 + restarts)
        h.instance("InstanceExited", iid, host, exit_code=3, restarts=restarts + 1,
                   log_tail=["Traceback (most recent call last):", "ImportError: flask"])
    h.heartbeat(host)


def _host_lost(h: History) -> None:
    h.running(h.app).add(f"host-{h.app}-h1", "HostLost", host_id=f"{h.app}-h1",
                         reason="no heartbeat for 30s")


def _pending(h: History) -> None:
    host = f"{h.app}-h1"
    h.host(host, capacity=1).created().released().scaled(2).heartbeat(host, instances=1)
    h.add(f"placement-{h.app}", "PlacementFailed", app=h.app, release=1, process_type="web",
          wanted=2, placed=0, reason="no host has a free slot")


@dataclass(frozen=True)
class Situation:
    build: Callable[[History], Any]
    serving: bool
    says: tuple[str, ...]
    later: timedelta = timedelta(seconds=1)
    """How long after the last event `now` is."""


SITUATIONS = {
    "never created": Situation(lambda h: h.host(f"{h.app}-h1"), False, ("no app named",)),
    "deleted": Situation(lambda h: h.running(h.app).add(f"app-{h.app}", "AppDeleted",
                                                        name=h.app), False, ("was deleted",)),
    "no release": Situation(lambda h: h.created().scaled(1), False, ("no release yet",)),
    "no web process": Situation(
        lambda h: h.created().released(procfile={"worker": "python w.py"}).scaled(1), False,
        ("no `web` process type", "only: worker")),
    # Never scaled: web defaults to 1, for `why` as for the placer (ledger.vocabulary).
    "never scaled": Situation(lambda h: h.created().released(), False,
                              ("0 of 1 wanted web instances",)),
    "scaled to zero": Situation(lambda h: h.running(h.app).scaled(0), False,
                                ("scaled to zero",)),
    "maintenance": Situation(
        lambda h: h.running(h.app).add(f"app-{h.app}", "MaintenanceChanged", app=h.app,
                                       enabled=True), False, ("maintenance mode",)),
    "placements pending": Situation(_pending, False, (
        "Only 0 of 2 wanted web instances", "no host has a free slot", "1/1 slots used",
        "no healthy backend")),
    "crash loop": Situation(_crash_loop, False, (
        "crash-looping", "exit code 3", "after 4 restarts", "ImportError: flask",
        "no healthy backend")),
    "host lost": Situation(_host_lost, False, ("was declared lost", "no heartbeat for 30s",
                                               "no healthy backend")),
    "host suspect": Situation(lambda h: h.running(h.app), True, ("is suspect",),
                              later=timedelta(seconds=60)),
    "not started": Situation(
        lambda h: h.host(f"{h.app}-h1").created().released().scaled(1)
        .placed(f"{h.app}-i1", f"{h.app}-h1").heartbeat(f"{h.app}-h1"), False,
        ("has not started yet", "no healthy backend")),
    "not healthy yet": Situation(
        lambda h: h.host(f"{h.app}-h1").created().released().scaled(1)
        .placed(f"{h.app}-i1", f"{h.app}-h1")
        .instance("InstanceStarted", f"{h.app}-i1", f"{h.app}-h1", pid=7)
        .heartbeat(f"{h.app}-h1"), False, ("has not passed its health check",)),
    "failed rollout, old release serves": Situation(
        lambda h: h.running(h.app).add(f"placement-{h.app}", "ReleaseDeployed", app=h.app,
                                       release=1).released(2)
        .add(f"placement-{h.app}", "ReleaseFailed", app=h.app, release=2,
             reason="instances crash-looped"),
        True, ("v2 failed to deploy: instances crash-looped", "v1 keeps serving", "healthy")),
    "failed first rollout": Situation(
        lambda h: (_crash_loop(h), h.add(f"placement-{h.app}", "ReleaseFailed", app=h.app,
                                         release=1, reason="instance is crash-looping")),
        False, ("v1 failed to deploy: instance is crash-looping", "No earlier release",
                "exit code 3", "no healthy backend")),
    "serving": Situation(lambda h: h.running(h.app), True, ("is healthy", "->", ":9001")),
}


@pytest.mark.parametrize("name", list(SITUATIONS))
def test_why_names_the_reason_and_its_positions(name: str) -> None:
    situation = SITUATIONS[name]
    history = History("blog")
    situation.build(history)
    events = recorded(history.appends)
    now = events[-1].recorded_at + situation.later
    answer = explain("blog", events, now)
    text = "\n".join(answer.lines())
    assert answer.serving is situation.serving, text
    for phrase in situation.says:
        assert phrase in text, f"{phrase!r} missing from:\n{text}"
    for finding in answer.findings:
        if name != "never created":
            assert finding.positions, f"no position cited: {finding.text}"
        assert all(1 <= p <= len(events) for p in finding.positions)
    assert answer.summary.startswith("blog is " + ("serving" if situation.serving else "NOT"))


def test_serving_when_healthy_names_route_and_backend() -> None:
    history = History("blog").running("blog")
    history.domain("blog", "www.blog.example")
    answer = explain("blog", recorded(history.appends), T0 + timedelta(seconds=1))
    assert answer.serving
    text = "\n".join(answer.lines())
    assert "blog.tally.local, www.blog.example -> 10.1.0.7:9001" in text
    assert not [f for f in answer.findings if f.problem]


def test_unsequenced_events_are_ignored_and_order_does_not_matter() -> None:
    events = recorded(History("blog").running("blog").appends)
    pending = RecordedEvent(None, 999, "app-blog", 99, "ScaleChanged",
                            {"app": "blog", "scale": {"web": 0}}, {}, T0)
    answer = explain("blog", [pending, *reversed(events)], T0 + timedelta(seconds=1))
    assert answer.serving
    assert answer.as_dict()["head"] == len(events)


def test_crash_loop_counted_as_the_placer_counts_it() -> None:
    """The placer fails a rollout at 3 restarts (agents/placement.py Settings.crash_loop);
    `why` calls an instance crash-looping from the same count, not before."""
    iid, host = "blog-i1", "blog-h1"
    history = History("blog").host(host).created().released().scaled(1).placed(iid, host)
    history.instance("InstanceExited", iid, host, exit_code=3, restarts=2).heartbeat(host)
    text = "\n".join(explain("blog", recorded(history.appends), T0).lines())
    assert "exited with exit code 3" in text and "crash-looping" not in text, text
    history.instance("InstanceExited", iid, host, exit_code=3, restarts=3)
    text = "\n".join(explain("blog", recorded(history.appends), T0).lines())
    assert "crash-looping: it exited with exit code 3 after 3 restarts" in text, text


def test_a_crash_loop_shows_between_restarts_too() -> None:
    """Restarted again (InstanceStarted), the instance keeps its last exit code and `why`
    still calls it crash-looping, as Kubernetes keeps Last State and its restarts."""
    iid, host = "blog-i1", "blog-h1"
    history = History("blog").host(host).created().released().scaled(1).placed(iid, host)
    history.instance("InstanceExited", iid, host, exit_code=3, restarts=3)
    history.instance("InstanceStarted", iid, host, pid=4242).heartbeat(host)
    text = "\n".join(explain("blog", recorded(history.appends), T0).lines())
    assert "crash-looping: it exited with exit code 3 after 3 restarts" in text, text
