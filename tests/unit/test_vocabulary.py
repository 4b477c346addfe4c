"""One vocabulary (ledger/vocabulary.py): the placer, `why`, the API's fold and the views
apply the same rules to the same events, so they cannot disagree."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agents.fleet import Fleet
from agents.placement import Settings, decide
from api.state import fold
from ledger.events import RecordedEvent
from ledger.vocabulary import (
    LIVENESS_STREAM,
    HostState,
    InstanceState,
    Liveness,
    crash_looping,
    host_state,
    liveness_of,
    wanted,
)
from projectors import apps
from projectors.hosts import host_state as view_host_state
from projectors.projector import project
from projectors.why import explain

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Events(list[RecordedEvent]):
    def add(self, stream: str, type_: str, at: datetime = T0, **data: Any) -> Events:
        version = sum(1 for e in self if e.stream == stream) + 1
        self.append(RecordedEvent(len(self) + 1, len(self) + 1, stream, version, type_, data,
                                  {}, at))
        return self


def test_host_state_is_one_rule() -> None:
    live = Liveness(ttl=15, suspect_after=5)
    assert host_state(False, T0, T0 + timedelta(seconds=5), live) is HostState.ALIVE
    assert host_state(False, T0, T0 + timedelta(seconds=6), live) is HostState.SUSPECT
    assert host_state(False, T0, T0 + timedelta(seconds=16), live) is HostState.EXPIRED
    assert host_state(True, T0, T0, live) is HostState.LOST
    assert host_state(False, None, T0, live) is HostState.EXPIRED
    with pytest.raises(ValueError, match="suspect_after"):
        Liveness(ttl=5, suspect_after=6)


def test_a_placer_with_other_timings_announces_them_and_why_uses_them() -> None:
    """A placer run with --suspect-after 20 keeps placing on a host silent for 10 s; `why`
    must not call that host suspect (it did, with its own 5 s)."""
    settings = Settings(ttl=30, suspect_after=20)
    fleet = Fleet()
    first = decide(fleet, T0, settings)
    assert [(a.stream, [e.type for e in a.events]) for a in first] == [
        (LIVENESS_STREAM, ["LivenessSet"])]
    events = Events().add(LIVENESS_STREAM, "LivenessSet", **first[0].events[0].data)
    events.add("host-h1", "HostRegistered", host_id="h1", address="127.0.0.1",
               port_min=9000, port_max=9009, capacity=4)
    events.add("app-blog", "AppCreated", name="blog", owner="ann")
    events.add("app-blog", "ReleaseCreated", app="blog", release=1, bundle_digest="a" * 64,
               procfile={"web": "gunicorn app:app"}, config_version=0)
    events.add("build-blog.2", "BuildStarted", app="blog", release=1, builder="b",
               lease_s=30)  # placed only once built (w11)
    events.add("build-blog.2", "BuildSucceeded", app="blog", release=1, slug_digest="b" * 64,
               size_bytes=1, seconds=1.0)
    fleet.apply_all(events)
    now = T0 + timedelta(seconds=10)
    assert fleet.liveness == Liveness(30, 20) == liveness_of(events)
    assert fleet.hosts["h1"].state(now, fleet.liveness) is HostState.ALIVE
    placed = [e for a in decide(fleet, now, settings) for e in a.events]
    assert [e.type for e in placed] == ["InstancePlaced"]  # announced once, then placing
    events.add("placement-blog", "InstancePlaced", **placed[0].data)
    text = "\n".join(explain("blog", events, now).lines())
    assert "suspect" not in text, text
    later = T0 + timedelta(seconds=25)
    assert "suspect: no heartbeat for 25s" in "\n".join(explain("blog", events, later).lines())


def test_scale_changed_replaces_in_every_fold() -> None:
    """ScaleChanged carries the app's whole scale: the API's fold, the placer's fold and the
    apps view read the same scale from the same events."""
    events = Events().add("app-blog", "AppCreated", name="blog", owner="ann")
    events.add("app-blog", "ScaleChanged", app="blog", scale={"web": 2, "worker": 1})
    events.add("app-blog", "ScaleChanged", app="blog", scale={"web": 3})
    fleet = Fleet()
    fleet.apply_all(events)
    (row,) = project([apps.PROJECTOR], events)["apps"].all("apps")
    assert fold("blog", events).scale == fleet.apps["blog"].scale == row["scale"] == {"web": 3}


def test_defaults_and_crash_loop() -> None:
    procfile = {"web": "w", "worker": "x", "release": "r"}
    assert wanted(procfile, {}) == {"web": 1}
    assert wanted(procfile, {"web": 0, "worker": 2}) == {"worker": 2}
    assert crash_looping(InstanceState.EXITED, 3) and crash_looping("started", 3)
    assert not crash_looping(InstanceState.HEALTHY, 9) and not crash_looping("exited", 2)


def test_the_views_host_rule_is_the_same_rule() -> None:
    row = {"state": "alive", "last_heartbeat": T0, "registered_at": T0}
    live = Liveness(ttl=30, suspect_after=20)
    for seconds in (1, 21, 31):
        now = T0 + timedelta(seconds=seconds)
        assert view_host_state(row, now, live) is host_state(False, T0, now, live)
