"""All of tally's configuration, in one place: environment variables with defaults.

TALLY_HOME            where state lives (ledger cluster, logs, pid files); default ./var
TALLY_LEDGER_PORTS    the two ledger nodes' ports; default 5433,5434
TALLY_RELAYS          relay PUB endpoints, comma-separated; default tcp://127.0.0.1:5551,5552
TALLY_LEDGER_HA       `patroni` (default: a new ledger cluster runs under Patroni + etcd) or
                      `plain` (primary + synchronous standby, failover by hand)
TALLY_LEDGER_HA_PORTS a new Patroni cluster's REST (node a, b) and etcd (client, peer)
                      ports; default: ports free at `init`, kept in ledger/patroni.json
TALLY_PG_BIN          PostgreSQL binaries; default /usr/lib/postgresql/15/bin
TALLY_API_BIND        where `tally serve api` listens; default 127.0.0.1:8000
TALLY_MAX_BUNDLE_MB   largest bundle upload the API accepts; default 100
TALLY_BUILD_DIR       builders' folders (builds, per-app build caches); outside TALLY_HOME,
                      as the sandbox's user must reach them; default
                      /var/lib/tally-builds/<hash of TALLY_HOME> (root's: the builder
                      refuses a folder any other user made or may swap)
TALLY_APPS_DB_PORTS   the apps' PostgreSQL cluster (add-on databases; never the ledger's);
                      default 5443,5444
TALLY_APPS_DB_PORT    the apps' cluster's stable address (a kernel NAT to the primary, or
                      HAProxy), the port every DATABASE_URL names; default 5445, kept in
                      appsdb/proxy.json
TALLY_APPS_HA         `patroni` or `plain` for a new apps' cluster; default: as
                      TALLY_LEDGER_HA
TALLY_REDIS_PORTS     the ports Redis add-ons (one redis-server per app) take; default
                      6400-6499
TALLY_COLLECTOR       where host agents PUSH app logs (`tally serve collector` binds it);
                      default tcp://127.0.0.1:5560
TALLY_BALANCERS       where the balancers `tally up` starts listen (HOST:PORT, comma-separated);
                      default 127.0.0.1:8080,127.0.0.1:8081; apps' URLs name the first port
TALLY_BALANCERS_TLS   where they terminate TLS, one per balancer in the same order (none:
                      plain HTTP only); default 127.0.0.1:8443,127.0.0.1:8444
TALLY_AGENT_PORTS     one app port range per host agent `tally up` starts; default
                      7000-7099,7100-7199
TALLY_AGENT_TOKEN     a host agent's token for the API (`tally up` gives each its own)
TALLY_BALANCER_TOKEN  a balancer's token for the API: it reads the routing table with it
                      (`tally up` gives each balancer its own)
TALLY_BUILDER_TOKEN   a builder's token for the API (role builder; `tally up` gives its own)
TALLY_BUILDER_API     the API a builder speaks to; default http://TALLY_API_BIND
TALLY_API             the API the CLI talks to; default: as saved by `tally login`, else
                      http://127.0.0.1:8000
TALLY_TOKEN           the CLI's API token; default: as saved by `tally login`
TALLY_CREDENTIALS     where `tally login` saves them; default
                      $XDG_CONFIG_HOME/tally/credentials.json (~/.config/...)
TALLY_RUN_KEY         the API's key of one-off run tickets, hex (`tally up` makes one);
                      each agent gets its host's own, derived, when it registers
TALLY_ACME_DIRECTORY  an ACME directory URL: `tally up` then runs `tally serve acme`, which
                      gets apps' domains certificates from it (none by default)
TALLY_SEAL_KEY        the key sealing apps' certificate keys at rest (the API seals, the
                      balancers open; `tally up` makes one)
TALLY_RELAY_KEY       the relays' CURVE public key, z85 (`tally up` hands it to its daemons);
                      unset: subscribers speak plain ZeroMQ
TALLY_CURVE_KEYFILE   a control-plane daemon's CURVE keypair file, for the relays' PUB (and
                      a balancer's, for shipping its access log to the collector)
TALLY_COLLECTOR_KEY   the log collector's CURVE public key, z85 (`tally up` hands it to its
                      daemons); default: the key of $TALLY_HOME/secrets/collector.curve, made
                      on first use (the collector's machine)
TALLY_APP_UIDS        the Unix uids the API hands to apps, each once; default 200000-299999
TALLY_APP_USER_PREFIX what agents name apps' Unix users: <prefix><app>; default tally-
                      (two platforms on one machine need different ones, and uid blocks)
TALLY_BACKUP_REPO     the backup repository (root's, 0700; outside every database server's
                      data folder; best on another disk or machine); default
                      $TALLY_HOME/backups

Read by the CLI's options themselves (click `envvar=`, shown in each command's --help):
TALLY_APP             the app of a user command (`-a APP`)
TALLY_AGENT_API       `tally serve agent --api`
TALLY_BALANCER_API    `tally serve balancer --api`
TALLY_HOST_TTL        `tally serve placer --ttl`
TALLY_DEPLOY_TIMEOUT  `tally serve placer --deploy-timeout`
(and TALLY_API, TALLY_TOKEN, TALLY_API_BIND above, as options of the commands that take them)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from agents.backups.repository import SPOOL, archive_command
from agents.users import DEFAULT_PREFIX, PREFIX
from ledger.cluster import DEFAULT_BIN, Cluster, ClusterSpec
from ledger.patroni import ledger_cluster
from tally.client import Client


@dataclass(frozen=True)
class Config:
    home: Path
    ledger_ports: tuple[int, int]
    relays: tuple[str, ...]
    pg_bin: Path
    api_bind: str = "127.0.0.1:8000"
    max_bundle_bytes: int = 100 * 1024 * 1024
    build_dir_path: str = ""
    collector: str = "tcp://127.0.0.1:5560"
    apps_db_ports: tuple[int, int] = (5443, 5444)
    apps_db_port: int = 5445
    """The apps' cluster's stable address (agents/appsdb.py)."""
    apps_ha: bool = True
    redis_ports: tuple[int, int] = (6400, 6499)
    agent_ports: tuple[str, ...] = ("7000-7099", "7100-7199")
    """One port range per host agent `tally up` starts (h1, h2, ...)."""
    balancers: tuple[str, ...] = ("127.0.0.1:8080", "127.0.0.1:8081")
    balancers_tls: tuple[str, ...] = ("127.0.0.1:8443", "127.0.0.1:8444")
    acme_directory: str = ""
    """Where each balancer `tally up` starts listens; apps answer at the first one's port."""
    app_uids: tuple[int, int] = (200_000, 299_999)
    app_user_prefix: str = DEFAULT_PREFIX
    relay_key: str = ""
    """The relays' CURVE public key (z85); empty: relays without CURVE (ledger/curve.py)."""
    curve_keyfile: str = ""
    """This process's CURVE keypair file for subscribing to the relays (control plane)."""
    collector_key_text: str = ""
    """TALLY_COLLECTOR_KEY; empty: `collector_key` reads the local keypair file."""
    ledger_ha: bool = True
    ledger_ha_ports: tuple[int, int, int, int] | None = None
    backup_repo_path: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        env = dict(os.environ if env is None else env)
        ports = tuple(int(p) for p in env.get("TALLY_LEDGER_PORTS", "5433,5434").split(","))
        if len(ports) != 2:
            raise ValueError("TALLY_LEDGER_PORTS must name two ports, e.g. 5433,5434")
        relays = env.get("TALLY_RELAYS", "tcp://127.0.0.1:5551,tcp://127.0.0.1:5552")
        return cls(
            home=Path(env.get("TALLY_HOME", "var")).resolve(),
            ledger_ports=(ports[0], ports[1]),
            relays=tuple(r.strip() for r in relays.split(",") if r.strip()),
            pg_bin=Path(env.get("TALLY_PG_BIN", str(DEFAULT_BIN))),
            api_bind=env.get("TALLY_API_BIND", "127.0.0.1:8000"),
            max_bundle_bytes=int(env.get("TALLY_MAX_BUNDLE_MB", "100")) * 1024 * 1024,
            build_dir_path=env.get("TALLY_BUILD_DIR", ""),
            collector=env.get("TALLY_COLLECTOR", "tcp://127.0.0.1:5560"),
            balancers=tuple(b.strip() for b in env.get(
                "TALLY_BALANCERS", "127.0.0.1:8080,127.0.0.1:8081").split(",") if b.strip()),
            acme_directory=env.get("TALLY_ACME_DIRECTORY", ""),
            balancers_tls=tuple(b.strip() for b in env.get(
                "TALLY_BALANCERS_TLS", "127.0.0.1:8443,127.0.0.1:8444").split(",")
                if b.strip()),
            agent_ports=tuple(r.strip() for r in env.get(
                "TALLY_AGENT_PORTS", "7000-7099,7100-7199").split(",") if r.strip()),
            relay_key=env.get("TALLY_RELAY_KEY", ""),
            curve_keyfile=env.get("TALLY_CURVE_KEYFILE", ""),
            collector_key_text=env.get("TALLY_COLLECTOR_KEY", ""),
            ledger_ha=env.get("TALLY_LEDGER_HA", "patroni") != "plain",
            ledger_ha_ports=_ha_ports(env.get("TALLY_LEDGER_HA_PORTS")),
            apps_db_ports=_two_ports(env.get("TALLY_APPS_DB_PORTS", "5443,5444"),
                                     "TALLY_APPS_DB_PORTS"),
            apps_db_port=int(env.get("TALLY_APPS_DB_PORT", "5445")),
            apps_ha=env.get("TALLY_APPS_HA", env.get("TALLY_LEDGER_HA", "patroni")) != "plain",
            redis_ports=_range(env.get("TALLY_REDIS_PORTS", "6400-6499"), "TALLY_REDIS_PORTS",
                               "6400-6499"),
            app_uids=_range(env.get("TALLY_APP_UIDS", "200000-299999"), "TALLY_APP_UIDS",
                            "200000-299999"),
            app_user_prefix=_user_prefix(env.get("TALLY_APP_USER_PREFIX", DEFAULT_PREFIX)),
            backup_repo_path=env.get("TALLY_BACKUP_REPO", ""),
        )

    def secret(self, name: str) -> Path:
        """A file in $TALLY_HOME/secrets (tokens, CURVE keypairs), 0700 folder."""
        return self.home / "secrets" / name

    def collector_key(self) -> bytes:
        """The log collector's CURVE public key: TALLY_COLLECTOR_KEY, or on the collector's
        machine the public half of its keypair (made on first use, 0600 in secrets/)."""
        if self.collector_key_text:
            return self.collector_key_text.encode()
        from ledger import curve

        return curve.load_or_create(self.secret("collector.curve")).public

    @property
    def web_port(self) -> int | None:
        """The port apps' URLs name (the first balancer's), or None without balancers."""
        return int(self.balancers[0].rpartition(":")[2]) if self.balancers else None

    def cluster(self) -> Cluster:
        """The ledger's cluster; its primary archives WAL into the spool the backup agent
        empties into the repository (agents/backups/repository.py)."""
        return ledger_cluster(ClusterSpec(self.home / "ledger", ports=self.ledger_ports,
                                          bin_dir=self.pg_bin,
                                          archive_command=archive_command(self.wal_spool)),
                              self.ledger_ha_ports, new_ha=self.ledger_ha)

    @property
    def wal_spool(self) -> Path:
        """Where the ledger's servers drop finished WAL segments (postgres's own folder
        beside the cluster's sockets, outside every data folder)."""
        return self.home.resolve() / "ledger" / "run" / SPOOL

    @property
    def backup_repo(self) -> Path:
        """The backup repository (agents/backups/repository.py)."""
        return Path(self.backup_repo_path) if self.backup_repo_path else self.home / "backups"

    @property
    def backup_scratch(self) -> Path:
        """Where backups are restored to be checked (root:postgres 0710)."""
        return self.home / "backup-scratch"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    def apps_cluster(self) -> Cluster:
        """The apps' databases: a primary and a synchronous standby beside the ledger's,
        under Patroni (scope tally-apps) behind a stable address (agents/appsdb.py)."""
        from agents.appsdb import apps_cluster

        return apps_cluster(self.home / "appsdb", self.apps_db_ports, self.apps_db_port,
                            self.pg_bin, self.apps_ha)

    @property
    def addon_ports(self) -> frozenset[int]:
        """The add-on services' local ports (agents/netrules.py): an app may reach those of
        its own add-ons. The apps' cluster's stable address, its nodes (named by URLs of
        add-ons made before the stable address) and the Redis add-ons' range."""
        low, high = self.redis_ports
        return frozenset({self.apps_db_port, *self.apps_db_ports, *range(low, high + 1)})

    @property
    def redis_dir(self) -> Path:
        """Redis add-ons, one folder per app (agents/redisaddon.py)."""
        return self.home / "redis"

    @property
    def app_logs_dir(self) -> Path:
        """App logs as the collector writes them: <app>/current.log and chunk-*.log."""
        return self.home / "applogs"

    @property
    def build_dir(self) -> Path:
        """Where builders build and keep each app's build cache (agents/builder.py)."""
        if self.build_dir_path:
            return Path(self.build_dir_path)
        return Path("/var/lib/tally-builds") / hashlib.sha256(
            str(self.home).encode()).hexdigest()[:12]

    @property
    def build_logs_dir(self) -> Path:
        """Build output, one file per build, read by the API for the app's people."""
        return self.home / "builds"

    @property
    def bundles_dir(self) -> Path:
        """Uploaded app bundles, content-addressed: <sha256>.tar.gz."""
        return self.home / "bundles"


def _ha_ports(text: str | None) -> tuple[int, int, int, int] | None:
    if not text:
        return None
    ports = tuple(int(p) for p in text.split(","))
    if len(ports) != 4:
        raise ValueError("TALLY_LEDGER_HA_PORTS must name four ports: REST a, REST b, "
                         "etcd client, etcd peer")
    return ports[0], ports[1], ports[2], ports[3]


def _two_ports(text: str, name: str) -> tuple[int, int]:
    try:
        a, b = (int(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"{name} must name two ports, e.g. 5443,5444") from None
    return a, b


def _user_prefix(text: str) -> str:
    if not PREFIX.fullmatch(text):
        raise ValueError("TALLY_APP_USER_PREFIX must be up to 15 of a-z, 0-9, _ and -, "
                         f"starting with a letter or _, e.g. tally-; not {text!r}")
    return text


def _range(text: str, name: str, example: str) -> tuple[int, int]:
    try:
        first, last = (int(p) for p in text.split("-"))
    except ValueError:
        raise ValueError(f"{name} must be a range, e.g. {example}") from None
    return first, last


def agent_token(env: dict[str, str] | None = None) -> str:
    """TALLY_AGENT_TOKEN: a host agent's token for the API ("" when unset)."""
    return dict(os.environ if env is None else env).get("TALLY_AGENT_TOKEN", "")


def seal_key_from_env(env: dict[str, str] | None = None) -> str | None:
    """TALLY_SEAL_KEY, or None when unset."""
    return dict(os.environ if env is None else env).get("TALLY_SEAL_KEY") or None


def balancer_token(env: dict[str, str] | None = None) -> str:
    """TALLY_BALANCER_TOKEN: a balancer's token for the API ("" when unset)."""
    return dict(os.environ if env is None else env).get("TALLY_BALANCER_TOKEN", "")


def builder_token(env: dict[str, str] | None = None) -> str:
    """TALLY_BUILDER_TOKEN: a builder's token for the API ("" when unset)."""
    return dict(os.environ if env is None else env).get("TALLY_BUILDER_TOKEN", "")


def credentials_path(env: dict[str, str] | None = None) -> Path:
    """Where `tally login` keeps the API and token: TALLY_CREDENTIALS, else
    $XDG_CONFIG_HOME/tally/credentials.json (~/.config when unset)."""
    env = dict(os.environ if env is None else env)
    if env.get("TALLY_CREDENTIALS"):
        return Path(env["TALLY_CREDENTIALS"])
    base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "tally" / "credentials.json"


def api_client(api: str | None = None, token: str | None = None,
               env: dict[str, str] | None = None) -> Client:
    """The API client as the command line and the environment say: `api` or TALLY_API,
    `token` or TALLY_TOKEN, else what `tally login` saved."""
    env = dict(os.environ if env is None else env)
    return Client(api or env.get("TALLY_API") or None, token or env.get("TALLY_TOKEN") or None,
                  credentials_path(env))


def run_key_from_env(env: dict[str, str] | None = None) -> bytes | None:
    """The run tickets' key, TALLY_RUN_KEY (hex), as `tally up` hands it to the API; None
    when unset (no one-off runs)."""
    from ledger.tickets import parse_key

    text = dict(os.environ if env is None else env).get("TALLY_RUN_KEY", "")
    try:
        return parse_key(text) if text else None
    except ValueError as exc:
        raise ValueError(f"TALLY_RUN_KEY: {exc}") from exc
