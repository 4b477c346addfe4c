"""The event catalogue: every fact tally records, in the order of the platform's story.

Each event type names the stream category it belongs to and a marshmallow schema for its
payload. Appends are validated against these schemas, and a payload of an older schema
version is upcast on read, never rewritten in the ledger (both in ledger/payloads.py).
Reading this module top to bottom tells what the platform can know.

Streams are `category-id`: `app-blog`, `host-h1`, `placement-blog`, `instance-<uuid>`,
`backup-ledger`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from marshmallow import Schema, fields, validate

from ledger.errors import InvalidEvent
from ledger.sizes import SIZES

# Patterns end in \Z, not $: `$` also matches before a final newline ("blog\n").
APP_NAME = validate.Regexp(
    r"^[a-z][a-z0-9-]{1,28}[a-z0-9]\Z",
    error="must be 3-30 characters: lowercase letters, digits and dashes, "
    "starting with a letter and not ending with a dash",
)
PROCESS_TYPE = r"^[a-z][a-z0-9_]{0,29}\Z"
SHA256 = validate.Regexp(r"^[0-9a-f]{64}\Z", error="must be a sha256 hex digest")
PORT = validate.Range(min=1, max=65535)
APP_UID = validate.Range(min=1000, max=2**31 - 2)
NON_NEGATIVE = validate.Range(min=0)
USER_NAME = validate.Regexp(
    r"^[a-z][a-z0-9_.-]{1,39}\Z",
    error="must be 2-40 characters: lowercase letters, digits, dots, dashes, underscores, "
    "starting with a letter",
)
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DNS_NAME = validate.Regexp(rf"^(?=.{{1,200}}\Z){_LABEL}(\.{_LABEL})*\Z",
                           error="must be a DNS name like tally.local or localhost")
STREAM_ID = re.compile(r"^([a-z][a-z0-9_]*)-([A-Za-z0-9][A-Za-z0-9_.:*-]*)\Z")
MAX_STREAM = 200
"""Longest stream id, in characters."""


def category_of(stream: str) -> str | None:
    """`app-blog` -> `app`; None for a malformed stream id."""
    match = STREAM_ID.match(stream)
    return match.group(1) if match and len(stream) <= MAX_STREAM else None


def stream_category(stream: str) -> str:
    """`app-blog` -> `app`. Raises InvalidEvent for a malformed stream id."""
    category = category_of(stream)
    if category is None:
        raise InvalidEvent(
            f"stream id {stream!r} must look like category-id (e.g. app-blog)",
            {"_stream": ["must look like category-id"]},
        )
    return category


@dataclass(frozen=True)
class EventType:
    """One kind of fact: its name, the stream category it lives in, and its schema."""

    name: str
    category: str
    schema: Schema
    doc: str
    version: int = 1
    upcasters: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = field(
        default_factory=dict
    )


CATALOGUE: dict[str, EventType] = {}


def event(category: str, version: int = 1) -> Callable[[type[Schema]], type[Schema]]:
    """Register a schema class as an event type named after the class."""

    def register(cls: type[Schema]) -> type[Schema]:
        doc = (cls.__doc__ or "").strip()
        CATALOGUE[cls.__name__] = EventType(cls.__name__, category, cls(), doc, version)
        return cls

    return register


def upcaster(type_name: str, from_version: int) -> Callable:
    """Register a function turning a payload of `from_version` into `from_version + 1`."""

    def register(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable:
        CATALOGUE[type_name].upcasters[from_version] = fn
        return fn

    return register


class Process(fields.Dict):
    """A mapping of process type (web, worker, release...) to a value."""

    def __init__(self, values: fields.Field, **kw: Any) -> None:
        super().__init__(keys=fields.Str(validate=validate.Regexp(PROCESS_TYPE)), values=values,
                         **kw)


# --- Apps: what developers ask for (desired state) ----------------------------------------


@event("app")
class AppCreated(Schema):
    """A developer created an app; its stream is app-<name>. `uid`: the Unix uid its
    processes run as on every host (AppUidAllocated; none in older events: agents then
    let useradd choose)."""

    name = fields.Str(required=True, validate=APP_NAME)
    owner = fields.Str(required=True, validate=validate.Length(min=1, max=200))
    uid = fields.Int(allow_none=True, validate=APP_UID)


@event("app")
class AppDeleted(Schema):
    """The app was deleted: everything stops, its history stays."""

    name = fields.Str(required=True, validate=APP_NAME)


@event("app")
class ConfigChanged(Schema):
    """Config vars were set or unset. Values are kept, and shown only when asked."""

    app = fields.Str(required=True, validate=APP_NAME)
    set = fields.Dict(keys=fields.Str(validate=validate.Regexp(r"^[A-Za-z_][A-Za-z0-9_]*\Z")),
                      values=fields.Str(), load_default=dict, metadata={"secret": True})
    unset = fields.List(fields.Str(), load_default=list)
    config_version = fields.Int(required=True, validate=NON_NEGATIVE)


@event("app")
class ReleaseCreated(Schema):
    """A new release: a bundle (code) plus a config version. Rollbacks are releases too."""

    app = fields.Str(required=True, validate=APP_NAME)
    release = fields.Int(required=True, validate=validate.Range(min=1))
    bundle_digest = fields.Str(required=True, validate=SHA256)
    procfile = Process(fields.Str(validate=validate.Length(min=1, max=2000)), required=True)
    config_version = fields.Int(required=True, validate=NON_NEGATIVE)
    description = fields.Str(load_default="", validate=validate.Length(max=500))
    rollback_of = fields.Int(allow_none=True, load_default=None)


@event("app")
class ScaleChanged(Schema):
    """The desired number of instances per process type: the app's whole scale (every type
    scaled so far), which replaces the one before (`ledger.vocabulary.fold_scale`); and the
    size of each type's instances (ledger/sizes.py: memory, processes, CPU weight; the
    default when absent), whole too.
    """

    app = fields.Str(required=True, validate=APP_NAME)
    scale = Process(fields.Int(validate=validate.Range(min=0, max=1000)), required=True)
    sizes = Process(fields.Str(validate=validate.OneOf(sorted(SIZES))))


@event("app")
class DomainAdded(Schema):
    """A hostname (exact, or `*.suffix`) now routes to the app."""

    app = fields.Str(required=True, validate=APP_NAME)
    domain = fields.Str(required=True, validate=validate.Length(min=1, max=253))


@event("app")
class DomainRemoved(Schema):
    """A hostname no longer routes to the app."""

    app = fields.Str(required=True, validate=APP_NAME)
    domain = fields.Str(required=True, validate=validate.Length(min=1, max=253))


@event("app")
class MaintenanceChanged(Schema):
    """Maintenance mode was switched: balancers answer 503 with a page, instances keep running."""

    app = fields.Str(required=True, validate=APP_NAME)
    enabled = fields.Bool(required=True)


class _Certificate(Schema):
    app = fields.Str(required=True, validate=APP_NAME)
    cert_id = fields.Str(required=True, validate=validate.Regexp(r"^[0-9a-f]{16}\Z"))
    hostnames = fields.List(fields.Str(validate=validate.Length(min=1, max=253)),
                            required=True, validate=validate.Length(min=1, max=100))
    not_after = fields.Str(required=True, metadata={"description": "ISO 8601, UTC"})
    cert_pem = fields.Str(required=True, validate=validate.Length(min=1, max=65536))
    key_sealed = fields.Str(required=True, validate=validate.Length(min=1, max=65536),
                            metadata={"secret": True})


@event("app")
class CertificateAdded(_Certificate):
    """An operator's own certificate for the app's hostnames it names (`tally certs:add`),
    served by the balancers by SNI. Its private key is sealed (ledger/tls.py): never in the
    ledger in the clear."""


@event("app")
class CertificateRequested(Schema):
    """An ACME order for the app's hostnames was placed: the balancers answer its HTTP-01
    challenges (`/.well-known/acme-challenge/TOKEN` -> the key authorization) until the
    order ends in CertificateIssued, CertificateRenewed or CertificateFailed."""

    app = fields.Str(required=True, validate=APP_NAME)
    hostnames = fields.List(fields.Str(validate=validate.Length(min=1, max=253)),
                            required=True, validate=validate.Length(min=1, max=100))
    challenges = fields.Dict(
        keys=fields.Str(validate=validate.Regexp(r"^[A-Za-z0-9_-]{1,200}\Z")),
        values=fields.Dict(keys=fields.Str(), values=fields.Str()), required=True,
        metadata={"description": "token -> {hostname, key_authorization}"})


@event("app")
class CertificateIssued(_Certificate):
    """An ACME CA issued a certificate for the app's hostnames (HTTP-01, answered by the
    balancers)."""


@event("app")
class CertificateRenewed(_Certificate):
    """An ACME certificate was renewed before it expired; it replaces the one it renews."""

    renews = fields.Str(required=True, validate=validate.Regexp(r"^[0-9a-f]{16}\Z"))


@event("app")
class CertificateFailed(Schema):
    """An ACME order for the app's hostnames failed (tried again later)."""

    app = fields.Str(required=True, validate=APP_NAME)
    hostnames = fields.List(fields.Str(), required=True)
    error = fields.Str(required=True, validate=validate.Length(max=2000))


@event("app")
class CertificateRemoved(Schema):
    """The certificate is no longer served."""

    app = fields.Str(required=True, validate=APP_NAME)
    cert_id = fields.Str(required=True, validate=validate.Regexp(r"^[0-9a-f]{16}\Z"))


@event("app")
class AppMemberAdded(Schema):
    """A user may now manage the app (besides its owner and admins)."""

    app = fields.Str(required=True, validate=APP_NAME)
    user = fields.Str(required=True, validate=USER_NAME)


@event("app")
class AppMemberRemoved(Schema):
    """A user may no longer manage the app."""

    app = fields.Str(required=True, validate=APP_NAME)
    user = fields.Str(required=True, validate=USER_NAME)


@event("app")
class RunStarted(Schema):
    """A person started a one-off command (`tally run`, `run:detached`) in the app: the API
    checked they may, chose the host and the release, and signed the agent's ticket. The
    actor is in the metadata."""

    app = fields.Str(required=True, validate=APP_NAME)
    number = fields.Int(required=True, validate=validate.Range(min=1))
    run_id = fields.Str(required=True, validate=validate.Length(min=1, max=64))
    command = fields.List(fields.Str(validate=validate.Length(max=4096)), required=True,
                          validate=validate.Length(min=1, max=200))
    host_id = fields.Str(required=True, validate=validate.Length(min=1, max=200))
    release = fields.Int(required=True, validate=validate.Range(min=1))
    detached = fields.Bool(load_default=False)


@event("app")
class RunEnded(Schema):
    """The run's command exited (its agent says, with the code and how long it ran), or its
    agent was lost (the API says: exit_code null)."""

    app = fields.Str(required=True, validate=APP_NAME)
    number = fields.Int(required=True, validate=validate.Range(min=1))
    run_id = fields.Str(required=True, validate=validate.Length(min=1, max=64))
    exit_code = fields.Int(allow_none=True, load_default=None)
    seconds = fields.Float(allow_none=True, load_default=None, validate=NON_NEGATIVE)
    host_id = fields.Str(allow_none=True, load_default=None)
    reason = fields.Str(load_default="", validate=validate.Length(max=500))


# --- Add-ons: an app's data services (PostgreSQL, Redis), each reached by a config var ----

ADDON_KINDS = ("postgresql", "redis")
ADDON_PLANS: dict[str, dict[str, dict[str, Any]]] = {
    "postgresql": {"standard": {"connections": 50}},
    # Memory limit and eviction policy. A Celery broker must never evict (a task lost):
    # only the cache plan evicts least-recently-used keys.
    "redis": {"mini": {"maxmemory_mb": 25, "policy": "noeviction"},
              "standard": {"maxmemory_mb": 100, "policy": "noeviction"},
              "cache": {"maxmemory_mb": 100, "policy": "allkeys-lru"}},
}
"""Each kind's plans, the first its default."""
ADDON_NAME = validate.Regexp(r"^(postgresql|redis)-[a-z][a-z0-9-]{1,28}[a-z0-9]\Z",
                             error="must be KIND-APP, e.g. postgresql-blog")
CONFIG_VAR = validate.Regexp(r"^[A-Z][A-Z0-9_]{0,60}_URL\Z",
                             error="must be upper case and end in _URL, e.g. DATABASE_URL")


class _Addon(Schema):
    app = fields.Str(required=True, validate=APP_NAME)
    addon = fields.Str(required=True, validate=ADDON_NAME)
    kind = fields.Str(required=True, validate=validate.OneOf(ADDON_KINDS))


@event("app")
class AddonCreated(_Addon):
    """The app got an add-on of its own (a database and role in the apps' cluster, or a
    Redis instance), with its plan and where it runs; the same append sets its config var
    (ConfigChanged, a new release). The credentials are in that config var only."""

    plan = fields.Str(required=True, validate=validate.Length(min=1, max=40))
    config_var = fields.Str(required=True, validate=CONFIG_VAR)
    where = fields.Str(load_default="", validate=validate.Length(max=200))


@event("app")
class AddonAttached(_Addon):
    """The app reaches another app's add-on (both of one owner) through `config_var`."""

    owner = fields.Str(required=True, validate=APP_NAME)
    plan = fields.Str(load_default="", validate=validate.Length(max=40))
    config_var = fields.Str(required=True, validate=CONFIG_VAR)
    where = fields.Str(load_default="", validate=validate.Length(max=200))


@event("app")
class AddonDetached(_Addon):
    """The app no longer reaches that add-on (its config var unset in the same append)."""

    config_var = fields.Str(required=True, validate=CONFIG_VAR)


@event("app")
class AddonDestroyed(_Addon):
    """The app's own add-on was destroyed (`addons:destroy`, or the app deleted): its
    database and role are dropped, or its Redis stopped and removed; no credential of it
    opens anything any more, and the apps it was attached to are detached."""

    reason = fields.Str(load_default="", validate=validate.Length(max=200))


@event("app")
class AddonDropped(_Addon):
    """A destroyed add-on's service is gone: the database and role dropped (after its final
    backup) or the Redis stopped and removed. Recorded by whoever dropped it: the API right
    after AddonDestroyed, or the add-ons' reaper (`tally serve addons`) retrying a drop
    that failed. Until then the add-on is "undropped": retried, and a new one of its name
    waits for it."""

    by = fields.Str(load_default="", validate=validate.Length(max=40))


# --- Hosts: the fleet reports itself (observed state) -------------------------------------


@event("host")
class HostRegistered(Schema):
    """A host agent joined the fleet with its address, port range and capacity."""

    host_id = fields.Str(required=True, validate=validate.Length(min=1, max=100))
    address = fields.Str(required=True)
    port_min = fields.Int(required=True, validate=PORT)
    port_max = fields.Int(required=True, validate=PORT)
    capacity = fields.Int(required=True, validate=validate.Range(min=0))
    memory_mb = fields.Int(load_default=0, validate=NON_NEGATIVE)
    run_endpoint = fields.Str(load_default="", validate=validate.Length(max=200))
    """ZeroMQ endpoint where the agent runs one-off commands (`tally run`); empty: none."""
    public_key = fields.Str(load_default="", validate=validate.Regexp(r"^([!-~]{40})?$"))
    """The host's CURVE public key (z85): the relays admit its subscriber (ledger/curve.py)."""


@event("heartbeat")
class HostHeartbeat(Schema):
    """A host is alive. High volume: kept in heartbeat-<host> streams, pruned by retention."""

    host_id = fields.Str(required=True)
    load = fields.Float(load_default=0.0)  # type: ignore[assignment]  # a field, not Schema.load
    memory_used_mb = fields.Int(load_default=0, validate=NON_NEGATIVE)
    memory_total_mb = fields.Int(load_default=0, validate=NON_NEGATIVE)
    instances = fields.Int(load_default=0, validate=NON_NEGATIVE)


@event("host")
class HostLost(Schema):
    """The placer declared a host lost (no heartbeat within the TTL)."""

    host_id = fields.Str(required=True)
    reason = fields.Str(load_default="")


@event("placer")
class LivenessSet(Schema):
    """The host-liveness timings the placer runs with (stream `placer-liveness`, appended
    when they change): whoever judges a host (`why`, `GET /hosts`) reads the same ones."""

    ttl = fields.Float(required=True, validate=validate.Range(min=0, min_inclusive=False))
    suspect_after = fields.Float(required=True,
                                 validate=validate.Range(min=0, min_inclusive=False))


# --- Placements: the placer's decisions (desired state) -----------------------------------


@event("placement")
class InstancePlaced(Schema):
    """The placer decided an instance of a release runs on a host and port."""

    instance_id = fields.Str(required=True)
    app = fields.Str(required=True, validate=APP_NAME)
    release = fields.Int(required=True, validate=validate.Range(min=1))
    process_type = fields.Str(required=True, validate=validate.Regexp(PROCESS_TYPE))
    host_id = fields.Str(required=True)
    port = fields.Int(required=True, validate=PORT)


@event("placement")
class InstanceUnplaced(Schema):
    """The placer withdrew an instance: no longer desired (scaled down, superseded by a new
    release, app deleted, host lost). The host agent stops it."""

    instance_id = fields.Str(required=True)
    app = fields.Str(required=True, validate=APP_NAME)
    reason = fields.Str(load_default="")


@event("placement")
class PlacementFailed(Schema):
    """The placer could not place every wanted instance of a process type (e.g. no host with
    free capacity); it tries again when the fleet changes."""

    app = fields.Str(required=True, validate=APP_NAME)
    release = fields.Int(required=True, validate=validate.Range(min=1))
    process_type = fields.Str(required=True, validate=validate.Regexp(PROCESS_TYPE))
    wanted = fields.Int(required=True, validate=NON_NEGATIVE)
    placed = fields.Int(required=True, validate=NON_NEGATIVE)
    reason = fields.Str(required=True)


@event("placement")
class ReleaseDeployed(Schema):
    """Every wanted instance of the release answered its health check (and its release phase,
    if any, succeeded): the placer withdraws the instances of older releases."""

    app = fields.Str(required=True, validate=APP_NAME)
    release = fields.Int(required=True, validate=validate.Range(min=1))


@event("placement")
class ReleaseFailed(Schema):
    """The release's instances never became healthy (crash loop, deadline) or its release
    phase failed: the placer withdraws them and the last deployed release keeps serving."""

    app = fields.Str(required=True, validate=APP_NAME)
    release = fields.Int(required=True, validate=validate.Range(min=1))
    reason = fields.Str(required=True)
    output = fields.List(fields.Str(validate=validate.Length(max=500)), load_default=list,
                         validate=validate.Length(max=100), metadata={
                             "description": "a failed release phase's last lines of output"})


# --- Instances: what host agents observe --------------------------------------------------


@event("instance")
class InstanceStarted(Schema):
    """A host agent started the instance's process."""

    instance_id = fields.Str(required=True)
    host_id = fields.Str(required=True)
    pid = fields.Int(required=True, validate=validate.Range(min=1))


@event("instance")
class InstanceHealthy(Schema):
    """The instance answered its health check."""

    instance_id = fields.Str(required=True)
    host_id = fields.Str(required=True)


@event("instance")
class InstanceExited(Schema):
    """The instance's process exited unasked; the last log lines tell why."""

    instance_id = fields.Str(required=True)
    host_id = fields.Str(required=True)
    exit_code = fields.Int(allow_none=True, load_default=None)
    signal = fields.Int(allow_none=True, load_default=None)
    restarts = fields.Int(load_default=0, validate=NON_NEGATIVE)
    log_tail = fields.List(fields.Str(), load_default=list)
    reason = fields.Str(load_default="", validate=validate.Length(max=500))
    """Why, when the host knows better than the exit code: `R15 ...` when the kernel
    killed it for its memory limit (agents/cgroups.py)."""


@event("instance")
class InstanceStopped(Schema):
    """The instance was stopped on purpose (no longer desired, or its host was lost)."""

    instance_id = fields.Str(required=True)
    host_id = fields.Str(allow_none=True, load_default=None)
    reason = fields.Str(load_default="")


# --- Builds: a release's code built once, in a sandbox, into a slug every host runs -----
# One stream per release: build-<app>.<version of the app stream at its ReleaseCreated>
# (release numbers restart when a deleted app is created again; stream versions never do).


class _Build(Schema):
    app = fields.Str(required=True, validate=APP_NAME)
    release = fields.Int(required=True, validate=validate.Range(min=1))


@event("build")
class BuildStarted(_Build):
    """A builder claimed the release's build, appended at the version it read: of two
    builders one wins. The claim lasts `lease_s` seconds from the last BuildStarted or
    BuildClaimRenewed; a builder that died lets it expire, and another claims it."""

    builder = fields.Str(required=True, validate=validate.Length(min=1, max=100))
    lease_s = fields.Float(required=True, validate=validate.Range(min=0.1, max=86400))
    attempt = fields.Int(load_default=1, validate=validate.Range(min=1))


@event("build")
class BuildClaimRenewed(_Build):
    """The builder holding the claim is still at work: the lease starts again."""

    builder = fields.Str(required=True, validate=validate.Length(min=1, max=100))


@event("build")
class BuildSucceeded(_Build):
    """The slug is stored: app files plus installed dependencies, a tar.gz content-addressed
    by its sha256, run by every host as is. `reused_from`: an earlier release of the same
    code whose slug this release runs (config changes and rollbacks do not rebuild)."""

    slug_digest = fields.Str(required=True, validate=SHA256)
    size_bytes = fields.Int(required=True, validate=NON_NEGATIVE)
    seconds = fields.Float(required=True, validate=NON_NEGATIVE)
    reused_from = fields.Int(allow_none=True, load_default=None)


@event("build")
class BuildFailed(_Build):
    """The build failed (its own error, a limit, a timeout): the release is never placed.
    The last lines of its output say why; they come from the sandbox, which reads no
    secret."""

    reason = fields.Str(required=True, validate=validate.Length(max=2000))
    log_tail = fields.List(fields.Str(validate=validate.Length(max=500)), load_default=list,
                           validate=validate.Length(max=50))
    seconds = fields.Float(load_default=0.0, validate=NON_NEGATIVE)


# --- Backups: historical, and not reachable from the servers ------------------------------


class _Backup(Schema):
    backup_id = fields.Str(required=True, validate=validate.Length(min=1, max=200))
    target = fields.Str(required=True, validate=validate.Length(min=1, max=200))
    """`ledger`, `addon:<app>` for an app's database, `redis:<app>` for its Redis."""


@event("backup")
class BackupStarted(_Backup):
    """A backup of a target (the ledger, an app database) began. Appended with the key
    `backup:<target>:<scheduled_for>` by a scheduled run: of two backup agents firing the
    same job, the one whose append wrote it runs it (`agent` says which)."""

    kind = fields.Str(load_default="full", validate=validate.OneOf(["full", "incremental"]))
    job = fields.Str(load_default="", validate=validate.Length(max=200))
    scheduled_for = fields.Str(load_default=None, allow_none=True,
                               validate=validate.Length(max=40))
    agent = fields.Str(load_default="", validate=validate.Length(max=200))
    reason = fields.Str(load_default="scheduled", validate=validate.Length(max=200))


@event("backup")
class BackupCompleted(_Backup):
    """The backup finished and was stored; it counts only once verified. `position`: every
    event up to it is in the backup; a base backup's WAL range says where it can start."""

    size_bytes = fields.Int(required=True, validate=NON_NEGATIVE)
    location = fields.Str(required=True)
    digest = fields.Str(required=True, validate=SHA256)
    duration_s = fields.Float(load_default=0.0)
    position = fields.Int(load_default=None, allow_none=True, validate=NON_NEGATIVE)
    timeline = fields.Int(load_default=None, allow_none=True)
    start_lsn = fields.Str(load_default=None, allow_none=True, validate=validate.Length(max=30))
    end_lsn = fields.Str(load_default=None, allow_none=True, validate=validate.Length(max=30))


@event("backup")
class BackupVerified(_Backup):
    """The stored backup was checked (pg_verifybackup), restored on a scratch port and
    found equal to the live ledger: `events` and `events_digest` up to `position`."""

    position = fields.Int(load_default=None, allow_none=True, validate=NON_NEGATIVE)
    events = fields.Int(load_default=None, allow_none=True, validate=NON_NEGATIVE)
    events_digest = fields.Str(load_default=None, allow_none=True)
    seconds = fields.Float(load_default=0.0, validate=NON_NEGATIVE)


@event("backup")
class BackupFailed(_Backup):
    """The backup or its verification failed (`stage`: backup, verify, recovery, schedule):
    it is never counted as good, and its files are removed."""

    error = fields.Str(required=True)
    stage = fields.Str(load_default="backup", validate=validate.Length(max=40))


@event("backup")
class BackupPruned(_Backup):
    """The backup left the retained set (GFS retention, after a newer one was verified)."""

    reason = fields.Str(load_default="")


@event("backup")
class BackupRestored(_Backup):
    """An add-on was restored in place from this backup (its file checked against the
    recorded sha256 first): who asked, the size loaded and how long it took."""

    actor = fields.Str(load_default="", validate=validate.Length(max=200))
    size_bytes = fields.Int(load_default=None, allow_none=True, validate=NON_NEGATIVE)
    seconds = fields.Float(load_default=0.0, validate=NON_NEGATIVE)


@event("backup")
class WalGapFound(_Backup):
    """Segments `first` to `last` are missing from the WAL archive (found by the backup
    agent): point-in-time recovery from the base backups in `cut` (`backup_id`: the newest
    of them) stops before them. Recorded once per gap."""

    first = fields.Str(required=True, validate=validate.Length(equal=24))
    last = fields.Str(required=True, validate=validate.Length(equal=24))
    cut = fields.List(fields.Str(validate=validate.Length(max=200)), load_default=list,
                      validate=validate.Length(max=1000))


# --- Domains: one owner per hostname across all apps --------------------------------------


@event("domain")
class DomainClaimed(Schema):
    """An app claimed a hostname; the stream domain-<host> (wildcards: domain-wildcard:<suffix>)
    holds at most one live claim, so no two apps route the same name."""

    domain = fields.Str(required=True, validate=validate.Length(min=1, max=253))
    app = fields.Str(required=True, validate=APP_NAME)


@event("domain")
class DomainReleased(Schema):
    """The claim ended (domain removed or app deleted); another app may claim it."""

    domain = fields.Str(required=True, validate=validate.Length(min=1, max=253))
    app = fields.Str(required=True, validate=APP_NAME)


# --- Identities: each app's Unix uid, never handed out twice ------------------------------


@event("uids")
class AppUidAllocated(Schema):
    """A Unix uid was handed to an app for ever; the stream uids-apps holds every
    allocation in order, so no uid is given twice, even after its app is deleted."""

    app = fields.Str(required=True, validate=APP_NAME)
    uid = fields.Int(required=True, validate=APP_UID)


# --- The platform: facts about the whole installation ------------------------------------


@event("platform")
class PlatformSuffixSet(Schema):
    """The platform's own DNS suffix: every app answers at <app>.<suffix> (tally.local until
    this is first recorded; `tally up` records localhost). A fact, not a setting, so a
    replay routes as the platform did then; no custom domain may fall under it."""

    suffix = fields.Str(required=True, validate=DNS_NAME)


# --- Users: who may do what through the API -----------------------------------------------


@event("user")
class UserCreated(Schema):
    """A person (admin, member), a host agent (agent, bound to one host), a balancer
    (balancer, bound to its host: it may read the routing table) or a builder (builder,
    bound to its name) got an account."""

    name = fields.Str(required=True, validate=USER_NAME)
    role = fields.Str(required=True, validate=validate.OneOf(
        ["admin", "member", "agent", "balancer", "builder"]))
    host_id = fields.Str(allow_none=True, load_default=None)


@event("user")
class TokenIssued(Schema):
    """An API token was issued. Only its sha256 is kept: the token itself is shown once."""

    user = fields.Str(required=True, validate=USER_NAME)
    token_id = fields.Str(required=True, validate=validate.Length(min=1, max=64))
    token_hash = fields.Str(required=True, validate=SHA256)
    label = fields.Str(load_default="", validate=validate.Length(max=200))


@event("user")
class TokenRevoked(Schema):
    """The token no longer opens anything."""

    user = fields.Str(required=True, validate=USER_NAME)
    token_id = fields.Str(required=True, validate=validate.Length(min=1, max=64))


# --- Quotas: what an admin lets a user or an app use --------------------------------------


def _limit() -> fields.Int:
    return fields.Int(allow_none=True, load_default=None, validate=validate.Range(min=0))


@event("quota")
class QuotaSet(Schema):
    """An admin set the limits of a user (all their apps together) or of one app; stream
    `quota-user:<name>` or `quota-app:<name>`. Each event holds every limit (None: the
    platform's default, api/quotas.py), so the last one is the whole quota."""

    subject = fields.Str(required=True, validate=validate.OneOf(["user", "app"]))
    name = fields.Str(required=True, validate=validate.Length(min=1, max=200))
    instances = _limit()
    memory_mb = _limit()
    bundle_mb = _limit()
    slug_mb = _limit()
    unpacked_mb = _limit()
    database_mb = _limit()


# --- The ledger itself: its guards and its leaders ---------------------------------------


@event("ledger")
class LedgerSessionTerminated(Schema):
    """The watchdog ended a session that held a transaction id too long: every ledger
    reader waits for the oldest one. In ledger-watchdog; the query with its literals
    blanked."""

    role = fields.Str(required=True, validate=validate.Length(max=100))
    database = fields.Str(required=True, validate=validate.Length(max=100))
    application = fields.Str(load_default="", validate=validate.Length(max=200))
    pid = fields.Int(required=True)
    duration_s = fields.Float(required=True, allow_nan=False)
    limit_s = fields.Float(required=True, allow_nan=False)
    query = fields.Str(load_default="", validate=validate.Length(max=500))


@event("ledger")
class LedgerLeaderChanged(Schema):
    """A node became the ledger's primary (the first one, or by a failover or switchover
    by Patroni) and accepts writes. In ledger-leaders, once per timeline."""

    leader = fields.Str(required=True, validate=validate.Length(max=100))
    previous = fields.Str(allow_none=True, load_default=None,
                          validate=validate.Length(max=100))
    timeline = fields.Int(required=True, validate=validate.Range(min=1))


# --- Retention: what the ledger forgot, on purpose -----------------------------------------


@event("retention")
class RetentionApplied(Schema):
    """Old events of a high-volume observed category (heartbeats) were deleted by the
    retention schedule (ledger/retention.py): each stream's newest one is always kept."""

    category = fields.Str(required=True)
    deleted = fields.Int(required=True, validate=NON_NEGATIVE)
    older_than_s = fields.Float(required=True, validate=NON_NEGATIVE)
    cutoff = fields.Str(required=True)
