"""Views: the platform's state derived from the ledger by the projectors (projectors/).

Every table below is written only by its projector, in the same transaction as that
projector's checkpoint, and read by everyone else (SELECT granted to tally_reader and
tally_writer). `*_position` columns name the ledger position of the event that last set the
fact, so any answer can cite its evidence. Times are the `recorded_at` of those events.

projector_checkpoints  one row per projector: position applied, lag (events, seconds),
                       state running/stopped/rebuilding, and the event that stopped it.
apps          (apps)        one row per live app: owner, current release, scale per process
                            type (jsonb {"web": 2}), config version, domains, maintenance flag.
                            A deleted app has no row (its history stays in the ledger).
releases      (apps)        one row per release of a live app: bundle digest, procfile, status
                            `current` (the one that should run) or `superseded`.
hosts         (hosts)       one row per registered host: address, port range, capacity, last
                            heartbeat. `state` holds facts only: `alive` or `lost` (HostLost, until
                            the next heartbeat). "suspect" depends on the clock, so readers derive
                            it: projectors.hosts.host_state(row, now) (alive, but no heartbeat
                            for SUSPECT_AFTER seconds).
placements    (placements)  desired: which instance of which app/release/process type runs on
                            which host and port, as the placer decided (InstancePlaced until
                            InstanceUnplaced).
instances     (instances)   observed: each placed or still-running instance: state placed/
                            started/healthy/exited/stopped, pid, since, exit code, signal,
                            restarts, last log lines. Rows leave once unplaced and not running.
routes        (routes)      hostname (exact or `*.suffix`) -> app, healthy backends
                            ["address:port", ...], maintenance flag, version (position of the last
                            event that touched the app's routing facts). Every live app with a
                            current release gets `<app>.tally.local` besides its domains
                            (projectors/routes.py).
routes_version (routes)     one row (id 1): the highest route version. Balancers compare it to
                            know when to reload.
route_apps, route_hosts, route_backends (routes)
                            the facts the routes projector joins, kept by itself so that it
                            never reads another projector's tables (they may be at another
                            position). Not meant for other readers.
backups       (backups)     per target: last good backup, last failure, the retained set
                            (jsonb list of {backup_id, completed_at, size_bytes, location,
                            digest, verified}).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLES = {
    "projector_checkpoints": """
        name            text PRIMARY KEY,
        position        bigint NOT NULL DEFAULT 0,
        generation      integer NOT NULL DEFAULT 0,
        state           text NOT NULL DEFAULT 'idle',
        head            bigint NOT NULL DEFAULT 0,
        lag_events      bigint NOT NULL DEFAULT 0,
        lag_seconds     double precision NOT NULL DEFAULT 0,
        updated_at      timestamptz,
        error_position  bigint,
        error_type      text,
        error_message   text,
        error_at        timestamptz""",
    "apps": """
        name                 text PRIMARY KEY,
        owner                text NOT NULL,
        current_release      integer,
        scale                jsonb NOT NULL DEFAULT '{}',
        config_version       integer NOT NULL DEFAULT 0,
        domains              text[] NOT NULL DEFAULT '{}',
        maintenance          boolean NOT NULL DEFAULT false,
        created_at           timestamptz,
        created_position     bigint,
        release_position     bigint,
        scale_position       bigint,
        maintenance_position bigint,
        position             bigint NOT NULL""",
    "releases": """
        app             text NOT NULL,
        release         integer NOT NULL,
        bundle_digest   text NOT NULL,
        procfile        jsonb NOT NULL,
        config_version  integer NOT NULL,
        description     text NOT NULL DEFAULT '',
        rollback_of     integer,
        status          text NOT NULL,
        created_at      timestamptz,
        position        bigint NOT NULL,
        PRIMARY KEY (app, release)""",
    "hosts": """
        host_id             text PRIMARY KEY,
        address             text NOT NULL,
        port_min            integer NOT NULL,
        port_max            integer NOT NULL,
        capacity            integer NOT NULL,
        memory_mb           integer NOT NULL DEFAULT 0,
        state               text NOT NULL,
        registered_at       timestamptz,
        registered_position bigint,
        last_heartbeat      timestamptz,
        heartbeat_position  bigint,
        load                double precision,
        memory_used_mb      integer,
        running_instances   integer,
        lost_position       bigint,
        lost_reason         text,
        position            bigint NOT NULL""",
    "placements": """
        instance_id   text PRIMARY KEY,
        app           text NOT NULL,
        release       integer NOT NULL,
        process_type  text NOT NULL,
        host_id       text NOT NULL,
        port          integer NOT NULL,
        placed_at     timestamptz,
        position      bigint NOT NULL""",
    "instances": """
        instance_id   text PRIMARY KEY,
        app           text,
        release       integer,
        process_type  text,
        host_id       text,
        port          integer,
        placed        boolean NOT NULL DEFAULT false,
        state         text NOT NULL,
        pid           integer,
        since         timestamptz,
        exit_code     integer,
        signal        integer,
        restarts      integer NOT NULL DEFAULT 0,
        log_tail      jsonb NOT NULL DEFAULT '[]',
        placed_position bigint,
        state_position  bigint,
        position      bigint NOT NULL""",
    "routes": """
        hostname     text PRIMARY KEY,
        app          text NOT NULL,
        backends     text[] NOT NULL DEFAULT '{}',
        maintenance  boolean NOT NULL DEFAULT false,
        version      bigint NOT NULL""",
    "routes_version": """
        id       integer PRIMARY KEY CHECK (id = 1),
        version  bigint NOT NULL""",
    "route_apps": """
        app              text PRIMARY KEY,
        current_release  integer,
        domains          text[] NOT NULL DEFAULT '{}',
        maintenance      boolean NOT NULL DEFAULT false""",
    "route_hosts": """
        host_id  text PRIMARY KEY,
        address  text NOT NULL,
        lost     boolean NOT NULL DEFAULT false""",
    "route_backends": """
        instance_id   text PRIMARY KEY,
        app           text NOT NULL,
        release       integer NOT NULL,
        process_type  text NOT NULL,
        host_id       text NOT NULL,
        port          integer NOT NULL,
        healthy       boolean NOT NULL DEFAULT false""",
    "backups": """
        target                  text PRIMARY KEY,
        last_ok_backup_id       text,
        last_ok_at              timestamptz,
        last_ok_position        bigint,
        last_failure_backup_id  text,
        last_failure_at         timestamptz,
        last_failure_error      text,
        last_failure_position   bigint,
        running                 jsonb NOT NULL DEFAULT '{}',
        retained                jsonb NOT NULL DEFAULT '[]',
        position                bigint NOT NULL""",
}

INDEXES = [
    "CREATE INDEX releases_app ON views.releases (app)",
    "CREATE INDEX placements_app ON views.placements (app)",
    "CREATE INDEX placements_host ON views.placements (host_id)",
    "CREATE INDEX instances_app ON views.instances (app)",
    "CREATE INDEX routes_app ON views.routes (app)",
]


def upgrade() -> None:
    op.execute("CREATE SCHEMA views")
    for name, columns in TABLES.items():
        op.execute(f"CREATE TABLE views.{name} ({columns})")
    for statement in INDEXES:
        op.execute(statement)
    op.execute("GRANT USAGE ON SCHEMA views TO tally_reader, tally_writer")
    op.execute("GRANT SELECT ON ALL TABLES IN SCHEMA views TO tally_reader, tally_writer")


def downgrade() -> None:
    op.execute("DROP SCHEMA views CASCADE")
