"""The routes view: hostname -> the healthy backends the balancers send it to.

A live app with a current release gets one route per hostname: its platform name
`<app>.<suffix>` (like Heroku's `<app>.herokuapp.com`; the suffix is the last
PlatformSuffixSet, `tally.local` before any) and each of its domains (exact names or
`*.suffix` wildcards, matched by the balancers) that it holds the claim of
(DomainClaimed/DomainReleased) and that is not reserved (under the platform's suffix, or a
wildcard covering it). A route is owned by claim, never by the last write: an app never
gets, nor removes, a hostname another app holds. Backends are the
`address:port` of its `web` instances that are placed, healthy, on a host not lost, and of
a serving release: the current release unless it failed, and the deployed one (during a
rolling deploy both serve, as in Kubernetes; after a failed one the deployed one goes on).
A route with no backend stays (balancers answer 503 "no healthy backend", not 404
"unknown host"). A route also says whether plain HTTP is redirected to HTTPS and which HSTS
value to send (the app's TALLY_FORCE_HTTPS and TALLY_HSTS config vars, ledger/tls.py), and
carries the app's certificate that covers its hostname (an exact name before a wildcard,
then the one valid longest), its key sealed, for the balancers' SNI; and the slug of the
newest serving release, whose static files the balancers serve. `version` is the
position of the last event that touched the app's routing facts; `routes_version` the last
such position for any app: balancers reload when it moves.

The routes projector keeps the facts it joins (apps, hosts, instances) in its own private
tables: reading other projectors' views would mix positions.
"""

from __future__ import annotations

from ledger.events import RecordedEvent
from ledger.hostnames import DEFAULT_SUFFIX, platform_hostname, reserved
from ledger.rules import (
    HOST_LOST_AFTER,
    ROLLOUT_EVENTS,
    domains_after,
    rollout_after,
    serving_releases,
)
from ledger.tls import covers, https_flags
from ledger.vocabulary import WEB
from projectors.projector import Projector, handlers_of, handles
from projectors.tables import Row, Tables


def suffix_of(t: Tables) -> str:
    row = t.get("route_platform", 1)
    return row["suffix"] if row else DEFAULT_SUFFIX


def _mark(t: Tables, app: str | None, position: int | None) -> None:
    if app is not None and position is not None:
        t.marks[app] = max(position, t.marks.get(app, 0))


@handles("AppCreated")
def app_created(t: Tables, e: RecordedEvent) -> None:
    t.put("route_apps", {"app": e.data["name"], "current_release": None, "domains": [],
                         "maintenance": False, "deployed_release": None,
                         "failed_releases": [], "https_only": False, "hsts": "",
                         "challenges": {}, "slugs": {}})
    _mark(t, e.data["name"], e.position)


@handles("AppDeleted")
def app_deleted(t: Tables, e: RecordedEvent) -> None:
    t.delete("route_apps", e.data["name"])
    for cert in t.by("route_certs", e.data["name"]):  # an app made again starts with none
        t.delete("route_certs", cert["cert_id"])
    _mark(t, e.data["name"], e.position)


@handles("ReleaseCreated", "ReleaseDeployed", "ReleaseFailed", "DomainAdded", "DomainRemoved",
         "MaintenanceChanged")
def app_changed(t: Tables, e: RecordedEvent) -> None:
    d = e.data
    app = t.get("route_apps", d["app"])
    if app is None:
        return
    if e.type == "ReleaseCreated":
        app = t.update("route_apps", app, current_release=d["release"])
    elif e.type in ROLLOUT_EVENTS:
        deployed, failed = rollout_after(app["deployed_release"],
                                         dict.fromkeys(app["failed_releases"], ""), e.type, d)
        app = t.update("route_apps", app, deployed_release=deployed,
                       failed_releases=sorted(failed))
    elif e.type == "MaintenanceChanged":
        app = t.update("route_apps", app, maintenance=d["enabled"])
    else:
        t.update("route_apps", app,
                 domains=sorted(domains_after(app["domains"], e.type, d["domain"])))
    _mark(t, d["app"], e.position)


@handles("ConfigChanged")
def config_changed(t: Tables, e: RecordedEvent) -> None:
    """Only the HTTPS config vars matter here (most config changes touch no route)."""
    d = e.data
    app = t.get("route_apps", d["app"])
    if app is None:
        return
    flags = https_flags((app["https_only"], app["hsts"]), d.get("set", {}), d.get("unset", []))
    if flags != (app["https_only"], app["hsts"]):
        t.update("route_apps", app, https_only=flags[0], hsts=flags[1])
        _mark(t, d["app"], e.position)


@handles("CertificateAdded", "CertificateIssued", "CertificateRenewed", "CertificateRemoved",
         "CertificateRequested", "CertificateFailed")
def certificate_changed(t: Tables, e: RecordedEvent) -> None:
    """An app's certificates, and the HTTP-01 challenges of its ACME orders under way (from
    CertificateRequested until the order ends, issued, renewed or failed)."""
    d = e.data
    app = t.get("route_apps", d["app"])
    if app is None:
        return
    if e.type == "CertificateRequested":
        t.update("route_apps", app, challenges={**app["challenges"], **d["challenges"]})
    elif e.type in ("CertificateIssued", "CertificateRenewed", "CertificateFailed"):
        ended = set(d["hostnames"])
        t.update("route_apps", app, challenges={
            token: c for token, c in app["challenges"].items() if c["hostname"] not in ended})
    if e.type == "CertificateRemoved":
        old = t.get("route_certs", d["cert_id"])
        if old is not None and old["app"] == d["app"]:
            t.delete("route_certs", d["cert_id"])
    elif e.type in ("CertificateAdded", "CertificateIssued", "CertificateRenewed"):
        if e.type == "CertificateRenewed":
            old = t.get("route_certs", d["renews"])
            if old is not None and old["app"] == d["app"]:
                t.delete("route_certs", d["renews"])
        t.put("route_certs", {"cert_id": d["cert_id"], "app": d["app"],
                              "hostnames": list(d["hostnames"]), "cert_pem": d["cert_pem"],
                              "key_sealed": d["key_sealed"], "not_after": d["not_after"]})
    _mark(t, d["app"], e.position)


def certificate_for(t: Tables, app_name: str, hostname: str) -> Row | None:
    """The app's certificate for `hostname`: exact names before wildcards, then the one
    valid longest (ISO times compare as text)."""
    fits = [c for c in t.by("route_certs", app_name)
            if any(covers(n, hostname) for n in c["hostnames"])]
    if not fits:
        return None
    best = max(fits, key=lambda c: (hostname in c["hostnames"], c["not_after"], c["cert_id"]))
    return {"cert": best["cert_pem"], "key": best["key_sealed"], "not_after": best["not_after"],
            "cert_id": best["cert_id"]}


@handles("BuildSucceeded")
def built(t: Tables, e: RecordedEvent) -> None:
    """A release's slug: the balancers serve the static files of the newest serving one."""
    d = e.data
    app = t.get("route_apps", d["app"])
    if app is None:
        return
    t.update("route_apps", app, slugs={**app["slugs"], str(d["release"]): d["slug_digest"]})
    _mark(t, d["app"], e.position)


def slug_of(app: Row, serving: set[int]) -> Row | None:
    """The newest serving release that has a slug, and its digest."""
    built_ = [r for r in serving if str(r) in app["slugs"]]
    if not built_:
        return None
    release = max(built_)
    return {"release": release, "digest": app["slugs"][str(release)]}


@handles("PlatformSuffixSet")
def suffix_set(t: Tables, e: RecordedEvent) -> None:
    """Every app's platform name changes: all routes are recomputed."""
    t.put("route_platform", {"id": 1, "suffix": e.data["suffix"]})
    for app in t.all("route_apps"):
        _mark(t, app["app"], e.position)


@handles("DomainClaimed", "DomainReleased")
def claim_changed(t: Tables, e: RecordedEvent) -> None:
    """One holder per hostname: a release by an app that does not hold it changes nothing."""
    domain, app = e.data["domain"], e.data["app"]
    old = t.get("route_claims", domain)
    if e.type == "DomainClaimed":
        t.put("route_claims", {"hostname": domain, "app": app})
        if old is not None:
            _mark(t, old["app"], e.position)
    elif old is not None and old["app"] == app:
        t.delete("route_claims", domain)
    _mark(t, app, e.position)


@handles("HostRegistered", "HostLost", "HostHeartbeat")
def host_changed(t: Tables, e: RecordedEvent) -> None:
    host_id = e.data["host_id"]
    old = t.get("route_hosts", host_id)
    if e.type == "HostRegistered":
        new = {"host_id": host_id, "address": e.data["address"],
               "lost": HOST_LOST_AFTER[e.type]}
    elif old is None:
        return
    else:
        new = {**old, "lost": HOST_LOST_AFTER[e.type]}
    if new == old:
        return  # the common heartbeat: nothing to recompute
    t.put("route_hosts", new)
    for backend in t.all("route_backends"):  # rare: a host joined, was lost or came back
        if backend["host_id"] == host_id:
            _mark(t, backend["app"], e.position)


@handles("InstancePlaced")
def placed(t: Tables, e: RecordedEvent) -> None:
    d = e.data
    old = t.get("route_backends", d["instance_id"])
    t.put("route_backends", {
        "instance_id": d["instance_id"], "app": d["app"], "release": d["release"],
        "process_type": d["process_type"], "host_id": d["host_id"], "port": d["port"],
        "healthy": bool(old and old["healthy"]),
    })
    _mark(t, d["app"], e.position)


@handles("InstanceUnplaced")
def unplaced(t: Tables, e: RecordedEvent) -> None:
    old = t.get("route_backends", e.data["instance_id"])
    if old is not None:
        t.delete("route_backends", old["instance_id"])
        _mark(t, old["app"], e.position)


@handles("InstanceHealthy", "InstanceStarted", "InstanceExited", "InstanceStopped")
def health_changed(t: Tables, e: RecordedEvent) -> None:
    old = t.get("route_backends", e.data["instance_id"])
    healthy = e.type == "InstanceHealthy"
    if old is not None and old["healthy"] != healthy:
        t.update("route_backends", old, healthy=healthy)
        _mark(t, old["app"], e.position)


def desired_routes(t: Tables, app_name: str) -> dict[str, Row]:
    """hostname -> route row (without version) the app should have now."""
    app = t.get("route_apps", app_name)
    if app is None or app["current_release"] is None:
        return {}
    serving = serving_releases(app["current_release"], app["deployed_release"],
                               app["failed_releases"])
    backends = []
    for b in t.by("route_backends", app_name):
        host = t.get("route_hosts", b["host_id"])
        if (b["healthy"] and b["release"] in serving and b["process_type"] == WEB
                and host is not None and not host["lost"]):
            backends.append(f"{host['address']}:{b['port']}")
    backends.sort()
    return {h: {"hostname": h, "app": app_name, "backends": backends,
                "maintenance": app["maintenance"], "https_only": app["https_only"],
                "hsts": app["hsts"], "tls": certificate_for(t, app_name, h),
                "challenges": {token: c["key_authorization"]
                               for token, c in app["challenges"].items() if c["hostname"] == h},
                "slug": slug_of(app, serving)}
            for h in hostnames(t, app)}


def hostnames(t: Tables, app: Row) -> list[str]:
    """The app's platform name, and the domains it holds the claim of, unless reserved."""
    suffix = suffix_of(t)
    held = [d for d in app["domains"] if not reserved(d, suffix)
            and (t.get("route_claims", d) or {}).get("app") == app["app"]]
    return [platform_hostname(app["app"], suffix), *held]


def recompute(t: Tables) -> None:
    """After a batch: bring the routes of every marked app up to date.

    A route's version is the position of the last event that touched its app's routing
    facts, and routes_version the last such position overall, whether or not the backends
    came out different: so the result never depends on where batches happen to end (the
    same events give the same rows live, rebuilt or replayed)."""
    for app_name, position in t.marks.items():
        want = desired_routes(t, app_name)
        for old in t.by("routes", app_name):
            if old["hostname"] not in want:
                t.delete("routes", old["hostname"])
        for row in want.values():
            t.put("routes", {**row, "version": position})
    if t.marks:
        last = max(t.marks.values())
        current = t.get("routes_version", 1)
        if current is None or current["version"] < last:
            t.put("routes_version", {"id": 1, "version": last})
    t.marks.clear()


PROJECTOR = Projector(
    name="routes",
    tables={"routes": ("hostname",), "routes_version": ("id",), "route_apps": ("app",),
            "route_hosts": ("host_id",), "route_backends": ("instance_id",),
            "route_claims": ("hostname",), "route_platform": ("id",),
            "route_certs": ("cert_id",)},
    public=("routes", "routes_version"),
    indexes={"routes": "app", "route_backends": "app", "route_certs": "app"},
    handlers=handlers_of(app_created, app_deleted, app_changed, config_changed,
                         certificate_changed, built, suffix_set, claim_changed, host_changed,
                         placed, unplaced, health_changed),
    finish=recompute,
)
