"""The apps and releases views: what developers asked for, and how rollouts went.

A release becomes the app's `current_release` (the placer's target) as soon as it is
created; rollbacks are releases too. Its status is `pending` while the placer rolls it out,
then `deployed` (ReleaseDeployed: every wanted instance healthy; earlier releases become
`superseded`) or `failed` (ReleaseFailed, with the reason; the deployed release keeps
serving). A deleted app loses its rows; its history stays in the ledger (`tally why` and
`tally state --at` still see it).
"""

from __future__ import annotations

from ledger.events import RecordedEvent
from ledger.rules import domains_after
from ledger.vocabulary import ReleaseStatus, fold_scale
from projectors.projector import Projector, handlers_of, handles
from projectors.tables import Tables


@handles("AppCreated")
def app_created(t: Tables, e: RecordedEvent) -> None:
    t.put("apps", {
        "name": e.data["name"], "owner": e.data["owner"], "current_release": None,
        "scale": {}, "config_version": 0, "domains": [], "maintenance": False,
        "created_at": e.recorded_at, "created_position": e.position, "release_position": None,
        "scale_position": None, "maintenance_position": None, "position": e.position,
        "deployed_release": None, "deployed_position": None,
    })


@handles("AppDeleted")
def app_deleted(t: Tables, e: RecordedEvent) -> None:
    name = e.data["name"]
    t.delete("apps", name)
    for release in t.by("releases", name):
        t.delete("releases", name, release["release"])


@handles("ConfigChanged")
def config_changed(t: Tables, e: RecordedEvent) -> None:
    _change(t, e, config_version=e.data["config_version"])


@handles("ReleaseCreated")
def release_created(t: Tables, e: RecordedEvent) -> None:
    d = e.data
    if t.get("apps", d["app"]) is None:
        return
    t.put("releases", {
        "app": d["app"], "release": d["release"], "bundle_digest": d["bundle_digest"],
        "procfile": d["procfile"], "config_version": d["config_version"],
        "description": d.get("description", ""), "rollback_of": d.get("rollback_of"),
        "status": ReleaseStatus.PENDING, "created_at": e.recorded_at, "position": e.position,
        "failure_reason": None, "status_position": e.position,
    })
    _change(t, e, current_release=d["release"], release_position=e.position)


@handles("ReleaseDeployed")
def release_deployed(t: Tables, e: RecordedEvent) -> None:
    app, number = e.data["app"], e.data["release"]
    for release in t.by("releases", app):
        if release["release"] == number:
            t.update("releases", release, status=ReleaseStatus.DEPLOYED, status_position=e.position)
        elif (release["status"] in (ReleaseStatus.PENDING, ReleaseStatus.DEPLOYED)
              and release["release"] < number):
            t.update("releases", release, status=ReleaseStatus.SUPERSEDED,
                     status_position=e.position)
    _change(t, e, deployed_release=number, deployed_position=e.position)


@handles("ReleaseFailed")
def release_failed(t: Tables, e: RecordedEvent) -> None:
    release = t.get("releases", e.data["app"], e.data["release"])
    if release is not None:
        t.update("releases", release, status=ReleaseStatus.FAILED, failure_reason=e.data["reason"],
                 status_position=e.position)


@handles("ScaleChanged")
def scale_changed(t: Tables, e: RecordedEvent) -> None:
    app = t.get("apps", e.data["app"])
    if app is not None:
        _change(t, e, scale=fold_scale(app["scale"], e.data["scale"]), scale_position=e.position)


@handles("DomainAdded", "DomainRemoved")
def domain_changed(t: Tables, e: RecordedEvent) -> None:
    app = t.get("apps", e.data["app"])
    if app is None:
        return
    _change(t, e, domains=sorted(domains_after(app["domains"], e.type, e.data["domain"])))


@handles("MaintenanceChanged")
def maintenance_changed(t: Tables, e: RecordedEvent) -> None:
    _change(t, e, maintenance=e.data["enabled"], maintenance_position=e.position)


def _change(t: Tables, e: RecordedEvent, **changes: object) -> None:
    app = t.get("apps", e.data["app"])
    if app is not None:
        t.update("apps", app, position=e.position, **changes)


PROJECTOR = Projector(
    name="apps",
    tables={"apps": ("name",), "releases": ("app", "release")},
    public=("apps", "releases"),
    indexes={"releases": "app"},
    handlers=handlers_of(app_created, app_deleted, config_changed, release_created,
                         release_deployed, release_failed, scale_changed, domain_changed,
                         maintenance_changed),
)
