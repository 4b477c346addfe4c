"""Marshmallow schemas of every request and response body; /openapi.json is built from
these, so what the API documents is what it validates and dumps."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate

from ledger import catalogue
from ledger.catalogue import ADDON_KINDS, ADDON_PLANS
from ledger.sizes import SIZES


def whole(v: validate.Regexp) -> list[Callable[[str], object]]:
    """`v`, and no newline: its `$` also matches before a final newline, which would make
    `blog\n` a name beside `blog`. (The check is a function, so /openapi.json keeps the
    plain pattern, which JSON Schema reads as meant.)"""
    def one_line(value: str) -> None:
        if "\n" in value:
            raise ValidationError(v.error.format(input=value, regex=v.regex.pattern))
    return [v, one_line]


APP_NAME = whole(catalogue.APP_NAME)
USER_NAME = whole(catalogue.USER_NAME)
ProcessType = fields.Str(validate=whole(validate.Regexp(catalogue.PROCESS_TYPE)))


class Error(Schema):
    error = fields.Str(required=True)
    message = fields.Str(required=True)
    fields_ = fields.Dict(required=True, data_key="fields")
    current = fields.Dict()
    quota = fields.Str(metadata={"description": "the quota exceeded (quota_exceeded only)"})


# --- users and tokens -----------------------------------------------------------------------


class UserCreate(Schema):
    name = fields.Str(required=True, validate=USER_NAME)
    role = fields.Str(load_default="member",
                      validate=validate.OneOf(["admin", "member", "agent", "balancer",
                                               "builder"]))
    host_id = fields.Str(load_default=None, allow_none=True,
                         validate=whole(validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")))


class User(Schema):
    name = fields.Str(required=True)
    role = fields.Str(required=True)
    host_id = fields.Str(allow_none=True)
    token_ids = fields.List(fields.Str())


class TokenCreate(Schema):
    label = fields.Str(load_default="", validate=validate.Length(max=200))


class Token(Schema):
    user = fields.Str(required=True)
    role = fields.Str(required=True)
    token_id = fields.Str(required=True)
    token = fields.Str(required=True, metadata={"description": "shown once, never stored"})


# --- apps -----------------------------------------------------------------------------------


class AppCreate(Schema):
    name = fields.Str(required=True, validate=APP_NAME)


class App(Schema):
    name = fields.Str(required=True)
    owner = fields.Str(allow_none=True)
    members = fields.List(fields.Str())
    created_at = fields.Str(allow_none=True)
    release = fields.Int(allow_none=True)
    process_types = fields.List(fields.Str())
    scale = fields.Dict(keys=fields.Str(), values=fields.Int())
    sizes = fields.Dict(keys=fields.Str(), values=fields.Str())
    domains = fields.List(fields.Str())
    maintenance = fields.Bool()
    config_version = fields.Int()
    version = fields.Int()
    web_url = fields.Str(allow_none=True, metadata={
        "description": "where the balancers serve the app: http://<app>.<suffix>[:port]/"})


class AppList(Schema):
    apps = fields.List(fields.Nested(App), required=True)


class MemberAdd(Schema):
    user = fields.Str(required=True, validate=USER_NAME)


class Release(Schema):
    number = fields.Int(required=True)
    bundle_digest = fields.Str(required=True)
    procfile = fields.Dict(keys=fields.Str(), values=fields.Str())
    config_version = fields.Int()
    description = fields.Str()
    rollback_of = fields.Int(allow_none=True)
    created_at = fields.Str(allow_none=True)
    created_by = fields.Str(allow_none=True)
    status = fields.Str(allow_none=True, metadata={
        "description": "in lists: pending, deployed, superseded or failed"})
    failure_reason = fields.Str(allow_none=True)


class ReleaseList(Schema):
    releases = fields.List(fields.Nested(Release), required=True)


class ReleaseQuery(Schema):
    digest = fields.Str(load_default=None, validate=whole(validate.Regexp(r"^[0-9a-f]{64}$")),
                        metadata={"description": "sha256 of the body; refused if different"})
    description = fields.Str(load_default="", validate=validate.Length(max=500))


class Rollback(Schema):
    release = fields.Int(load_default=None, allow_none=True,
                         validate=validate.Range(min=1, max=1_000_000),
                         metadata={"description": "default: the release before the current"})


class ScaleRequest(Schema):
    scale = fields.Dict(keys=ProcessType, values=fields.Int(validate=validate.Range(0, 1000)),
                        required=True, validate=validate.Length(min=1))
    sizes = fields.Dict(keys=ProcessType, load_default=dict,
                        values=fields.Str(validate=validate.OneOf(sorted(SIZES))))
    """Formation sizes (ledger/sizes.py), e.g. {"web": "standard-2x"}."""


def _limit() -> fields.Int:
    return fields.Int(allow_none=True, validate=validate.Range(0, 10_000_000))


class QuotaChange(Schema):
    """Limits to set; a null puts one back to the platform's default."""

    instances = _limit()
    memory_mb = _limit()
    bundle_mb = _limit()
    slug_mb = _limit()
    unpacked_mb = _limit()
    database_mb = _limit()


class Quota(Schema):
    subject = fields.Str(required=True)
    name = fields.Str(required=True)
    limits = fields.Dict(keys=fields.Str(), values=fields.Int(), required=True)
    used = fields.Dict(keys=fields.Str(), values=fields.Int(), required=True)


class Config(Schema):
    config = fields.Dict(keys=fields.Str(), values=fields.Str(), required=True)
    config_version = fields.Int(required=True)
    release = fields.Int(allow_none=True, metadata={
        "description": "after a change: the release it made (none before the first deploy)"})


class ConfigChange(Schema):
    set = fields.Dict(keys=fields.Str(validate=validate.Length(min=1, max=200)),
                      values=fields.Str(validate=validate.Length(max=32768)), load_default=dict)
    unset = fields.List(fields.Str(validate=validate.Length(min=1, max=200)), load_default=list)


class DomainAdd(Schema):
    domain = fields.Str(required=True, validate=validate.Length(min=1, max=253))


class CertAdd(Schema):
    cert = fields.Str(required=True, validate=validate.Length(min=1, max=65536), metadata={
        "description": "the certificate chain, PEM, leaf first"})
    key = fields.Str(required=True, validate=validate.Length(min=1, max=65536), metadata={
        "description": "its private key, PEM, unencrypted (sealed before it is recorded)"})


class CertInfo(Schema):
    """A certificate of an app, without its key."""

    cert_id = fields.Str(required=True)
    hostnames = fields.List(fields.Str(), required=True)
    not_after = fields.Str(required=True)
    source = fields.Str(required=True, metadata={"description": "manual or acme"})
    added_at = fields.Str(allow_none=True, required=True)


class Domains(Schema):
    domains = fields.List(fields.Str(), required=True)


class Maintenance(Schema):
    enabled = fields.Bool(required=True)


# --- events, history ------------------------------------------------------------------------


class UtcDateTime(fields.AwareDateTime):
    """An ISO 8601 time with an offset, as UTC: ISO allows offsets PostgreSQL refuses
    (+20:48) and instants Python cannot move to UTC (year 1 at +14:00); both are 422."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        parsed = super()._deserialize(value, attr, data, **kwargs)
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            raise ValidationError("out of range once moved to UTC") from None


class EventsQuery(Schema):
    after = fields.Int(load_default=0, validate=validate.Range(min=0))
    limit = fields.Int(load_default=100, validate=validate.Range(min=1, max=1000))
    type = fields.List(fields.Str(validate=validate.Length(max=100)), load_default=None)
    category = fields.List(fields.Str(validate=validate.Length(max=100)), load_default=None)
    wait = fields.Float(load_default=0.0, validate=validate.Range(min=0, max=30),
                        metadata={"description": "long-poll: seconds to wait for new events"})
    show_secrets = fields.Bool(load_default=False)
    stream = fields.List(fields.Str(validate=validate.Length(max=200)), load_default=None)
    since = UtcDateTime(load_default=None, default_timezone=UTC, metadata={
        "description": "recorded at or after this time (ISO 8601)"})
    newest = fields.Bool(load_default=False, metadata={
        "description": "the last `limit` events (after `after`) instead of the first; "
                       "`head` is then the ledger's head"})


class Event(Schema):
    position = fields.Int(allow_none=True)
    stream = fields.Str(required=True)
    version = fields.Int(required=True)
    type = fields.Str(required=True)
    data = fields.Dict(required=True)
    metadata = fields.Dict(required=True)
    recorded_at = fields.Str(required=True)


class EventList(Schema):
    events = fields.List(fields.Nested(Event), required=True)
    head = fields.Int(required=True)


# --- fleet ----------------------------------------------------------------------------------


class HostRegister(Schema):
    """What a field leaves out, a re-registration keeps from the host's last one."""

    address = fields.Str(validate=validate.Length(min=1, max=200))
    port_min = fields.Int(validate=validate.Range(1, 65535))
    port_max = fields.Int(validate=validate.Range(1, 65535))
    capacity = fields.Int(validate=validate.Range(0, 100_000))
    memory_mb = fields.Int(validate=validate.Range(0, 1 << 30))
    run_endpoint = fields.Str(validate=validate.Length(max=200))
    public_key = fields.Str(validate=validate.Regexp(r"^([!-~]{40})?$"), metadata={
        "description": "the host's CURVE public key (z85): the relays admit its subscriber"})


class Heartbeat(Schema):
    # A field named `load` (the host's load average): marshmallow takes declared fields off
    # the class, so Schema.load stays the method; mypy sees the class body only.
    load = fields.Float(load_default=0.0,  # type: ignore[assignment]
                        validate=validate.Range(0, 1e6))
    memory_used_mb = fields.Int(load_default=0, validate=validate.Range(0, 1 << 30))
    memory_total_mb = fields.Int(load_default=0, validate=validate.Range(0, 1 << 30))
    instances = fields.Int(load_default=0, validate=validate.Range(0, 1 << 20))


class InstanceEvent(Schema):
    type = fields.Str(required=True, validate=validate.OneOf(
        ["InstanceStarted", "InstanceHealthy", "InstanceExited", "InstanceStopped"]))
    data = fields.Dict(required=True)
    key = fields.Str(load_default=None, validate=validate.Length(min=8, max=100), metadata={
        "description": "idempotency key: the same report sent again is recorded once"})


class HeartbeatAccepted(Schema):
    accepted = fields.Bool(required=True)
    desired = fields.Int(required=True, metadata={
        "description": "version of the host's desired state: GET /hosts/ID/desired when it "
                       "moved past the one the agent has"})


class DesiredQuery(Schema):
    after = fields.Int(load_default=0, validate=validate.Range(min=0), metadata={
        "description": "the version the agent has: nothing is sent unless it moved"})
    apps = fields.List(fields.Str(validate=APP_NAME), load_default=list,
                       validate=validate.Length(max=200), metadata={
                           "description": "apps with files on the host not placed there: "
                                          "whether they still exist, their releases"})


class Desired(Schema):
    """What the placer wants on one host, resolved for its agent: placements with their
    release's digest, command and config vars."""

    host_id = fields.Str(required=True)
    version = fields.Int(required=True)
    changed = fields.Bool(required=True)
    placements = fields.List(fields.Dict(), required=True, metadata={
        "description": "instance_id, app, release, process_type, port"})
    apps = fields.Dict(keys=fields.Str(), values=fields.Dict(), required=True, metadata={
        "description": "per app: current, deployed, failed, sizes, uid, releases (digest, "
                       "procfile, config_version), configs (the config vars of placed "
                       "releases), addons (where its add-ons run, host:port)"})


class RunEndedReport(Schema):
    run_id = fields.Str(required=True, validate=validate.Length(min=1, max=64))
    exit_code = fields.Int(load_default=None, allow_none=True)
    seconds = fields.Float(load_default=None, allow_none=True, validate=validate.Range(0, 1e9))
    key = fields.Str(load_default=None, validate=validate.Length(min=8, max=100), metadata={
        "description": "idempotency key: the same report sent again is recorded once"})


class StatsSample(Schema):
    app = fields.Str(required=True, validate=APP_NAME)
    instance_id = fields.Str(required=True, validate=validate.Length(min=1, max=200))
    requests = fields.Int(load_default=0, validate=validate.Range(0, 1 << 40))
    restarts = fields.Int(load_default=0, validate=validate.Range(0, 1 << 30))
    memory_bytes = fields.Int(load_default=None, allow_none=True,
                              validate=validate.Range(0, 1 << 50))
    cpu_seconds = fields.Float(load_default=None, allow_none=True,
                               validate=validate.Range(0, 1e12))


class StatsSamples(Schema):
    samples = fields.List(fields.Nested(StatsSample), required=True,
                          validate=validate.Length(max=1000))


class Written(Schema):
    written = fields.Int(required=True)


class RoutingQuery(Schema):
    after = fields.Int(load_default=0, validate=validate.Range(min=0), metadata={
        "description": "the routes_version the balancer has: no routes are sent unless it "
                       "moved"})
    position = fields.Int(load_default=0, validate=validate.Range(min=0), metadata={
        "description": "a ledger position a relay announced: answered once the routes "
                       "projector has applied it (or after a second)"})


class Routing(Schema):
    """The routing table as a balancer uses it."""

    version = fields.Int(required=True, metadata={"description": "routes_version"})
    checkpoint = fields.Int(required=True, metadata={
        "description": "the ledger position the routes projector has applied"})
    changed = fields.Bool(required=True)
    routes = fields.List(fields.Dict(), required=True, metadata={
        "description": "hostname, app, backends, maintenance, https_only, hsts, tls (its "
                       "certificate: cert_id, cert, key sealed, not_after; or null), "
                       "challenges (ACME HTTP-01: token -> key authorization), every route, "
                       "when changed"})


class Appended(Schema):
    stream = fields.Str(required=True)
    version = fields.Int(required=True)


class HostRegistered(Appended):
    run_key = fields.Str(required=True, allow_none=True, metadata={
        "description": "this host's key of run tickets (hex; derived from the platform's, "
                       "known to no other host); null when one-off runs are off"})
    run_channel_key = fields.Str(required=True, allow_none=True, metadata={
        "description": "the API's CURVE public key (z85): the one client the host's run "
                       "socket admits; null when one-off runs are off"})


class Rows(Schema):
    """A list of view rows (hosts, placements, instances, routes, backups)."""

    items = fields.List(fields.Dict(), required=True)


class Finding(Schema):
    text = fields.Str(required=True)
    positions = fields.List(fields.Int(), required=True)
    problem = fields.Bool(required=True)


class Why(Schema):
    app = fields.Str(required=True)
    serving = fields.Bool(required=True)
    head = fields.Int(required=True)
    summary = fields.Str(required=True)
    findings = fields.List(fields.Nested(Finding), required=True)


class StateQuery(Schema):
    at = fields.Int(required=True, validate=validate.Range(min=0, max=2**62))
    view = fields.Str(load_default=None, validate=validate.Length(min=1, max=100))


class State(Schema):
    at = fields.Int(required=True)
    views = fields.Dict(keys=fields.Str(), values=fields.List(fields.Dict()), required=True)


class DiffQuery(Schema):
    a = fields.Int(required=True, validate=validate.Range(min=0, max=2**62))
    b = fields.Int(required=True, validate=validate.Range(min=0, max=2**62))
    view = fields.Str(load_default=None, validate=validate.Length(min=1, max=100))


class Diff(Schema):
    a = fields.Int(required=True)
    b = fields.Int(required=True)
    views = fields.Dict(keys=fields.Str(), values=fields.Dict(), required=True, metadata={
        "description": "per view: added, removed (rows), changed (key, changes: column -> "
                       "[old, new])"})


class StatsQuery(Schema):
    minutes = fields.Int(load_default=60, validate=validate.Range(min=1, max=7 * 24 * 60),
                         metadata={"description": "the window: this many minutes up to now"})


class Stats(Schema):
    """An app's traffic and resources over a window, from the host agents' samples (one
    per running instance every 10 s)."""

    app = fields.Str(required=True)
    minutes = fields.Int(required=True)
    requests = fields.Int(required=True)
    requests_per_minute = fields.Float(required=True)
    memory_bytes = fields.Int(required=True, metadata={"description": "latest, all instances"})
    instances = fields.List(fields.Dict(), required=True, metadata={
        "description": "instance_id, host_id, requests, memory_bytes, restarts, cpu_percent, "
                       "last_sample_at"})
    series = fields.List(fields.Dict(), required=True,
                         metadata={"description": "requests per minute: minute, requests"})
    router = fields.Dict(required=True, metadata={
        "description": "the balancers' router metrics over the window: requests, s1xx..s5xx "
                       "(by status class), held, retries, p50_ms, p95_ms, p99_ms"})


COUNT = validate.Range(0, 1 << 40)
"""A counter in a sample: bounded, as the tables storing it are (bigint)."""


class RouterSample(Schema):
    """What one balancer routed to one app since its previous sample."""

    app = fields.Str(required=True, validate=APP_NAME)
    requests = fields.Int(required=True, validate=COUNT)
    s1xx = fields.Int(load_default=0, validate=COUNT)
    s2xx = fields.Int(load_default=0, validate=COUNT)
    s3xx = fields.Int(load_default=0, validate=COUNT)
    s4xx = fields.Int(load_default=0, validate=COUNT)
    s5xx = fields.Int(load_default=0, validate=COUNT)
    held = fields.Int(load_default=0, validate=COUNT)
    retries = fields.Int(load_default=0, validate=COUNT)
    latency_sum = fields.Float(load_default=0.0, validate=validate.Range(0, 1e12),
                               allow_nan=False)
    buckets = fields.Dict(keys=fields.Str(validate=validate.Regexp(r"^[0-9]{1,3}\Z")),
                          values=fields.Int(validate=COUNT),
                          load_default=dict, validate=validate.Length(max=300), metadata={
                              "description": "latency bucket index -> requests "
                                             "(ledger/latency.py)"})


class RouterSamples(Schema):
    samples = fields.List(fields.Nested(RouterSample), required=True,
                          validate=validate.Length(max=10_000))


class LogsQuery(Schema):
    lines = fields.Int(load_default=100, validate=validate.Range(min=0, max=10_000))
    follow = fields.Bool(load_default=False, metadata={
        "description": "then keep sending new lines: text/event-stream, one `data:` event "
                       "per line, a `:` comment every 5 s while quiet"})


class Logs(Schema):
    app = fields.Str(required=True)
    lines = fields.List(fields.Str(), required=True)


class RunCreate(Schema):
    """A one-off command: `tally run` (attached: then open its `attach` WebSocket) or
    `tally run:detached` (its output goes to the app's logs)."""

    command = fields.List(fields.Str(validate=validate.Length(max=4096)), required=True,
                          validate=validate.Length(min=1, max=200))
    detached = fields.Bool(load_default=False)


class Run(Schema):
    app = fields.Str(required=True)
    number = fields.Int(required=True, metadata={"description": "shown as run.N"})
    command = fields.List(fields.Str(), required=True)
    host_id = fields.Str(required=True)
    release = fields.Int(required=True)
    detached = fields.Bool(required=True)
    actor = fields.Str(allow_none=True)
    started_at = fields.Str(allow_none=True)
    ended = fields.Bool(required=True)
    exit_code = fields.Int(allow_none=True)
    attach = fields.Str(allow_none=True, metadata={
        "description": "the WebSocket to attach to (attached runs, by who started them)"})


class AddonCreate(Schema):
    kind = fields.Str(required=True, validate=validate.OneOf(ADDON_KINDS))
    plan = fields.Str(load_default=None, metadata={
        "description": "postgresql: standard; redis: " + ", ".join(ADDON_PLANS["redis"])})


class AttachmentCreate(Schema):
    addon = fields.Str(required=True, validate=validate.Length(min=1, max=80), metadata={
        "description": "another app's add-on (same owner), e.g. postgresql-blog"})
    as_ = fields.Str(data_key="as", load_default=None, validate=validate.Regexp(
        r"^[A-Za-z][A-Za-z0-9_]{0,55}\Z", error="letters, digits and _"), metadata={
        "description": "the config var's name (ALIAS_URL); default the kind's own"})


class Addons(Schema):
    app = fields.Str(required=True)
    release = fields.Int(allow_none=True, metadata={"description": "the app's release now"})
    addons = fields.List(fields.Dict(), required=True, metadata={
        "description": "each add-on the app reaches: name, kind, plan, config_var, owner "
        "(the app it belongs to), state (created: its own; attached: another app's), "
        "where"})


class AppBackup(Schema):
    """One backup of an app's add-on: a dump of its database or an RDB of its Redis."""

    backup_id = fields.Str(required=True)
    target = fields.Str(required=True, metadata={"description": "addon:APP or redis:APP"})
    kind = fields.Str(metadata={"description": "postgresql | redis"})
    state = fields.Str(required=True, metadata={
        "description": "running | completed | verified | failed | pruned"})
    started_at = fields.Str(required=True)
    job = fields.Str(allow_none=True)
    scheduled_for = fields.Str(allow_none=True)
    size_bytes = fields.Int(allow_none=True)
    duration_s = fields.Float(allow_none=True)
    position = fields.Int(allow_none=True)
    events = fields.Int(allow_none=True)
    error = fields.Str(allow_none=True)
    location = fields.Str(allow_none=True)


class AppBackups(Schema):
    app = fields.Str(required=True)
    backups = fields.List(fields.Nested(AppBackup), required=True)


class BackupsQuery(Schema):
    kind = fields.Str(load_default="postgresql", validate=validate.OneOf(["postgresql",
                                                                          "redis"]),
                      metadata={"description": "which add-on's backups"})


class BackupRestore(Schema):
    confirm = fields.Str(required=True, validate=validate.Length(max=100), metadata={
        "description": "the app's name: the restore overwrites its add-on's data"})
    progress = fields.Bool(load_default=False, metadata={
        "description": "answer as text/event-stream: a `data:` event per step, then "
                       "`event: done` with the backup (JSON) or `event: error` with why"})


class Build(Schema):
    """One release's build: how it went, and (with `offset`) its output from there on."""

    release = fields.Int(required=True)
    status = fields.Str(required=True, metadata={
        "description": "pending | building | succeeded | failed"})
    builder = fields.Str(allow_none=True)
    attempt = fields.Int()
    slug_digest = fields.Str(allow_none=True)
    size_bytes = fields.Int()
    seconds = fields.Float()
    reason = fields.Str()
    reused_from = fields.Int(allow_none=True)
    output = fields.Str(metadata={"description": "build output from `offset` on"})
    offset = fields.Int(metadata={"description": "where the next read of the output starts"})


class BuildList(Schema):
    builds = fields.List(fields.Nested(Build), required=True)


class BuildQuery(Schema):
    offset = fields.Int(load_default=0, validate=validate.Range(min=0))
    limit = fields.Int(load_default=256 * 1024, validate=validate.Range(min=0, max=1 << 20))


class QueuedBuild(Schema):
    app = fields.Str(required=True)
    release = fields.Int(required=True)
    attempt = fields.Int(required=True, metadata={"description": "the attempt a claim makes"})


class BuildQueue(Schema):
    """What builders may claim now, newest first."""

    builds = fields.List(fields.Nested(QueuedBuild), required=True)


class BuildClaimRequest(Schema):
    lease_s = fields.Float(load_default=30.0, validate=validate.Range(min=1.0, max=600.0))


class BuildClaim(Schema):
    """A claimed build: what the builder needs to build it (or an earlier slug it got)."""

    app = fields.Str(required=True)
    release = fields.Int(required=True)
    attempt = fields.Int(required=True)
    reused_from = fields.Int(allow_none=True, metadata={
        "description": "set when the release got an earlier release's slug: nothing to build"})
    bundle_digest = fields.Str(required=True)
    config = fields.Dict(keys=fields.Str(), values=fields.Str(), required=True)
    build_uid = fields.Int(allow_none=True, metadata={
        "description": "the uid the build runs as (the app's own build uid)"})
    slug_max_bytes = fields.Int(required=True, metadata={
        "description": "the app's slug_mb quota, in bytes"})
    lease_s = fields.Float(required=True)


class BuildAttempt(Schema):
    attempt = fields.Int(required=True, validate=validate.Range(min=1))


class BuildOutput(BuildAttempt):
    text = fields.Str(required=True, validate=validate.Length(max=1 << 20))


class BuildFailure(BuildAttempt):
    reason = fields.Str(required=True, validate=validate.Length(max=2000))
    log_tail = fields.List(fields.Str(validate=validate.Length(max=500)),
                           load_default=list, validate=validate.Length(max=100))
    seconds = fields.Float(load_default=0.0, validate=validate.Range(min=0))


class SlugUpload(BuildAttempt):
    seconds = fields.Float(load_default=0.0, validate=validate.Range(min=0))
