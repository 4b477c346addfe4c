"""Every fold of the ledger reads the same story the same way (ledger/rules.py): the API's
fold of an app (api/state.py), its directory of who manages what (api/auth.py), the
placer's and agents' fleet (agents/fleet.py), the agents' fleet from the API's snapshot
(agents/desired.py) and the views (projectors/). One history goes into all of them; where
two of them hold the same fact, they must hold the same value."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from agents.desired import fleet_of
from agents.fleet import Fleet
from api.auth import Directory
from api.hosts import Placements
from api.state import AppState, fold
from ledger.events import RecordedEvent
from ledger.rules import release_to_run, serving_releases
from projectors import apps, hosts, instances, routes
from projectors.projector import project
from projectors.tables import Tables

T0 = datetime(2026, 1, 1, tzinfo=UTC)
VIEWS = [apps.PROJECTOR, hosts.PROJECTOR, instances.PROJECTOR, routes.PROJECTOR]


class Story(list[RecordedEvent]):
    def add(self, stream: str, type_: str, **data: Any) -> Story:
        version = sum(1 for e in self if e.stream == stream) + 1
        at = T0 + timedelta(seconds=len(self))
        self.append(RecordedEvent(len(self) + 1, len(self) + 1, stream, version, type_, data,
                                  {"actor": "ann"}, at))
        return self


def story() -> Story:
    s = Story().add("app-blog", "AppCreated", name="blog", owner="ann")
    for type_, user in (("AppMemberAdded", "bob"), ("AppMemberAdded", "cy"),
                        ("AppMemberRemoved", "bob"), ("AppMemberAdded", "cy")):
        s.add("app-blog", type_, app="blog", user=user)
    s.add("app-blog", "ConfigChanged", app="blog", set={"A": "1", "B": "2"}, unset=[],
          config_version=1)
    # A key both unset and set in one change (PATCH /apps/blog/config allows it): set wins.
    s.add("app-blog", "ConfigChanged", app="blog", set={"B": "3"}, unset=["B", "A"],
          config_version=2)
    s.add("app-blog", "ReleaseCreated", app="blog", release=1, bundle_digest="d" * 64,
          procfile={"web": "gunicorn app:app"}, config_version=2)
    for type_, domain in (("DomainAdded", "x.example"), ("DomainAdded", "y.example"),
                          ("DomainRemoved", "x.example"), ("DomainAdded", "x.example")):
        s.add("app-blog", type_, app="blog", domain=domain)
    s.add("app-blog", "ScaleChanged", app="blog", scale={"web": 3})
    for h in ("h1", "h2"):
        s.add(f"host-{h}", "HostRegistered", host_id=h, address="127.0.0.1", port_min=7000,
              port_max=7009, capacity=4)
        s.add(f"host-{h}", "HostLost", host_id=h, reason="silent")
    s.add("heartbeat-h1", "HostHeartbeat", host_id="h1")  # heard from again: back
    for i in (1, 2, 3):
        s.add("placement-blog", "InstancePlaced", instance_id=f"i{i}", app="blog", release=1,
              process_type="web", host_id="h1", port=7000 + i)
    s.add("instance-i1", "InstanceStarted", instance_id="i1", host_id="h1", pid=10)
    s.add("instance-i1", "InstanceHealthy", instance_id="i1", host_id="h1")
    s.add("instance-i2", "InstanceExited", instance_id="i2", host_id="h1", exit_code=1)
    for i in (1, 2):  # i1 still runs (kept until stopped), i2 has exited (gone)
        s.add("placement-blog", "InstanceUnplaced", instance_id=f"i{i}", app="blog",
              release=1, process_type="web", host_id="h1")
    s.add("instance-i9", "InstanceStarted", instance_id="i9", host_id="h1", pid=11)
    s.add("instance-i8", "InstanceExited", instance_id="i8", host_id="h1", exit_code=0)
    return s


def every_fold(events: Story) -> tuple[AppState, Fleet, Directory, dict[str, Tables]]:
    """The API's fold of app-blog, the fleet, the directory and the views, of `events`."""
    fleet, directory = Fleet(), Directory()
    fleet.apply_all(events)
    directory.apply(events)
    return (fold("blog", [e for e in events if e.stream == "app-blog"]), fleet, directory,
            project(VIEWS, events))


def test_every_fold_reads_the_same_story() -> None:
    app, fleet, directory, views = every_fold(story())
    (row,) = views["apps"].all("apps")
    (route_app,) = views["routes"].all("route_apps")
    placer_app = fleet.apps["blog"]

    assert app.config == placer_app.config_at(2) == {"B": "3"}
    assert placer_app.config_at(1) == app.configs[1] == {"A": "1", "B": "2"}
    assert app.members | {app.owner} == directory.managers["blog"] == {"ann", "cy"}
    assert sorted(app.domains) == row["domains"] == route_app["domains"] == [
        "x.example", "y.example"]
    assert app.scale == placer_app.scale == row["scale"] == {"web": 3}
    assert app.current.number == placer_app.current_release == row["current_release"] == (
        route_app["current_release"])
    lost = {h: host.lost for h, host in fleet.hosts.items()}
    assert lost == {r["host_id"]: r["state"] == "lost" for r in views["hosts"].all("hosts")}
    assert lost == {r["host_id"]: r["lost"] for r in views["routes"].all("route_hosts")}
    assert lost == {"h1": False, "h2": True}
    in_fleet = {i: inst.state for i, inst in fleet.instances.items()}
    in_view = {r["instance_id"]: r["state"] for r in views["instances"].all("instances")}
    assert in_fleet == in_view == {"i1": "healthy", "i3": "placed", "i9": "started"}


def test_the_agents_fleet_from_the_apis_snapshot_reads_the_same_config() -> None:
    """An agent's fleet is made from the API's snapshot of whole configs (agents/desired.py),
    not from the events: the same config per version all the same."""
    app = fold("blog", [e for e in story() if e.stream == "app-blog"])
    snapshot = {"apps": {"blog": {"current": 1, "releases": {}, "configs": {
        str(v): c for v, c in app.configs.items()}}}}
    agent_app = fleet_of(snapshot).apps["blog"]
    assert [agent_app.config_at(v) for v in (0, 1, 2)] == [app.configs[v] for v in (0, 1, 2)]


def test_a_deleted_app_is_gone_from_every_fold() -> None:
    app, fleet, directory, views = every_fold(story().add("app-blog", "AppDeleted",
                                                          name="blog"))
    assert not app.exists and "blog" not in fleet.apps and "blog" not in directory.managers
    assert not list(views["apps"].all("apps")) and not list(views["routes"].all("route_apps"))


def test_the_release_the_placer_runs_is_one_that_serves() -> None:
    """The placer's target and the routes' serving releases are two rules of one story
    (ledger/rules.py): whatever the rollout facts, the release placed takes traffic once
    healthy, and a failed current release gives way to a deployed one."""
    for current in (1, 2, 3):
        for deployed in (None, 1, 2, 3):
            for failed in ((), (current,), (1,), (1, 2), (1, 2, 3)):
                target = release_to_run(current, deployed, failed)
                assert target in serving_releases(current, deployed, failed)
    assert release_to_run(3, 2, (3,)) == 2 and serving_releases(3, 2, (3,)) == {2}
    assert serving_releases(3, 2, ()) == {2, 3}  # a rolling deploy: both serve
    assert release_to_run(3, None, (3,)) == 3 == min(serving_releases(3, None, (3,)))


def test_every_fold_of_a_rollout_holds_the_same_deployed_and_failed_releases() -> None:
    """ReleaseDeployed and ReleaseFailed into the placer's fleet, the API's placements
    (what hosts are sent, api/hosts.py) and the routes view: the same deployed release and
    failed ones, and a host is sent the config of the release the placer runs."""
    s = story()
    s.add("app-blog", "ReleaseCreated", app="blog", release=2, bundle_digest="e" * 64,
          procfile={"web": "gunicorn app:app"}, config_version=2)
    for type_, release, then_runs in (("ReleaseDeployed", 1, 2), ("ReleaseFailed", 2, 1),
                                      ("ReleaseDeployed", 1, 1)):
        s.add("app-blog", type_, app="blog", release=release, reason="crashed")
        placements = Placements()
        placements.apply(e for e in s if e.stream.split("-")[0] in ("app", "placement"))
        app, fleet, _, views = every_fold(s)
        (route_app,) = views["routes"].all("route_apps")
        placer_app = fleet.apps["blog"]
        assert placer_app.deployed == placements.deployed["blog"] == (
            route_app["deployed_release"]) == 1
        assert placer_app.failed == placements.failed.get("blog", {})
        assert sorted(placer_app.failed) == route_app["failed_releases"]
        assert app.current.number == 2
        runs = release_to_run(2, placer_app.deployed, placer_app.failed)
        assert runs == then_runs
        assert placements.shown("blog", 2, {1}) == {1, runs}
        assert placements.shown("blog", 2, set()) == set(), "nothing placed: no configs"
    assert placements.failed["blog"] == {2: "crashed"}
