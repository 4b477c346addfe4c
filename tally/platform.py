"""What `tally up` runs on one machine: each daemon's name, `tally` arguments, and where
a person reaches it. Each part adds its daemons here; tally/supervise.py runs the table
under supervisord, tally/systemd.py writes it as systemd units."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ledger.cluster import Cluster
from ledger.patroni import PatroniCluster, Process
from tally import supervise
from tally.client import save_credentials
from tally.config import Config, credentials_path
from tally.supervise import Program

LEDGER_PART = "ledger"
"""The supervisord part (and program name prefix) of the ledger's etcd and Patroni."""


def daemons(cfg: Config) -> list[tuple[str, list[str], str]]:
    out = [
        (f"relay-{i}", ["serve", "relay", "--endpoint", endpoint, "--curve"],
         f"{endpoint} (CURVE)")
        for i, endpoint in enumerate(cfg.relays, start=1)
    ]
    out.append(("watchdog", ["serve", "watchdog"],
                "ends ledger sessions holding a transaction id > 10 s (tally events)"))
    out.append(("projectors", ["serve", "projectors"],
                "views in the ledger database (tally projectors status)"))
    out.append(("api", ["serve", "api", "--bind", cfg.api_bind], f"http://{cfg.api_bind}"))
    out.append(("collector", ["serve", "collector"], f"{cfg.collector} -> {cfg.app_logs_dir}"))
    out.append(("placer", ["serve", "placer"], "places instances (its decisions: tally events)"))
    out.append(("addon-reaper", ["serve", "addons"],
                "retries add-on drops that failed (AddonDropped once done: tally events)"))
    out.append(("retention", ["serve", "retention"],
                "heartbeats older than 1h, stats samples older than 7d, removed every 5m"))
    out.append(("backups", ["serve", "backups"],
                f"ledger base backups hourly, add-on dumps daily, WAL archive, each verified "
                f"(tally backups; repository {cfg.backup_repo})"))
    out.append(("builder", ["serve", "builder"],
                f"builds releases into slugs, sandboxed, through the API (work: "
                f"{cfg.build_dir})"))
    for i, bind in enumerate(cfg.balancers, start=1):
        tls = cfg.balancers_tls[i - 1:i]
        out.append((f"balancer-{i}", ["serve", "balancer", "--bind", bind,
                                      "--balancer-id", f"b{i}",
                                      *(("--tls-bind", tls[0]) if tls else ())],
                    f"http://<app>.<suffix>:{bind.rpartition(':')[2]}/ (routes view)"
                    + (f", https on :{tls[0].rpartition(':')[2]} (tally certs:add)"
                       if tls else "")))
    if cfg.acme_directory:
        out.append(("acme", ["serve", "acme", "--directory", cfg.acme_directory],
                    f"certificates for apps' domains from {cfg.acme_directory}"))
    for i, ports in enumerate(cfg.agent_ports, start=1):
        out.append((f"agent-{i}", ["serve", "agent", "--host-id", f"h{i}", "--port-range",
                                   ports, "--stop-apps-on-exit"],
                    f"host h{i}, app ports {ports}"))
    return out


def ledger_cluster(cfg: Config) -> Cluster:
    """The ledger cluster as `tally up` runs it: under Patroni, etcd and each Patroni are
    supervisord's programs (etcd first), so one that dies comes back without a person."""
    cluster = cfg.cluster()
    if isinstance(cluster, PatroniCluster):
        def launch(processes: list[Process]) -> None:
            supervise.up(cfg, ledger_programs(processes), {}, part=LEDGER_PART)
        cluster.launch = launch
    return cluster


def ledger_programs(processes: list[Process], part: str = LEDGER_PART) -> list[Program]:
    return [Program(f"{part}-{p.name}", [], p.env, argv=p.argv, user=p.user,
                    priority=10 if p.name == "etcd" else 20) for p in processes]


def ledger_supervised(cfg: Config) -> bool:
    """Whether supervisord runs the ledger's processes (`tally up` is up)."""
    try:
        return any(d["name"].startswith(f"{LEDGER_PART}-") for d in supervise.status(cfg))
    except supervise.SupervisorError:
        return False


def programs(cfg: Config, secrets: bool = True) -> list[Program]:
    """The daemon table as Supervisor or systemd run it (`secrets`: with the agents'
    tokens, made on first use; without, for printing units)."""
    return [Program(name, args, environment(cfg, name) if secrets else {})
            for name, args, _ in daemons(cfg)]


def environment(cfg: Config, name: str) -> dict[str, str]:
    """Extra environment for one daemon (never on a command line). Every one learns the
    relays' and the log collector's CURVE public keys; host agents get only their agent
    token (they fetch bundles through the API as on a real fleet) and make their own keypair,
    registered through the API; the builder gets only its builder token (it asks the API for
    builds); the control plane's daemons (balancers too) use the control-plane keypair;
    the API gets the run tickets' key (each agent gets its host's own from the API when it
    registers)."""
    from ledger import curve

    relay_key = curve.load_or_create(cfg.secret("relay.curve")).public.decode()
    curve.load_or_create(cfg.secret("control.curve"))
    collector_key = cfg.collector_key().decode()
    for i, _ in enumerate(cfg.agent_ports, start=1):
        if name == f"agent-{i}":
            return {"TALLY_AGENT_TOKEN": host_token(cfg, f"h{i}", "agent"),
                    "TALLY_RELAY_KEY": relay_key, "TALLY_COLLECTOR_KEY": collector_key}
    if name == "builder":  # a fleet host too: its token, nothing else
        return {"TALLY_BUILDER_TOKEN": host_token(cfg, "builder-1", "builder")}
    control = {"TALLY_RELAY_KEY": relay_key, "TALLY_COLLECTOR_KEY": collector_key,
               "TALLY_CURVE_KEYFILE": str(cfg.secret("control.curve"))}
    for i, _ in enumerate(cfg.balancers, start=1):
        if name == f"balancer-{i}":  # its token; on one machine the control keypair wakes it
            return {"TALLY_BALANCER_TOKEN": host_token(cfg, f"b{i}", "balancer"),
                    "TALLY_SEAL_KEY": seal_key(cfg), **control}
    if name == "api":
        return {"TALLY_RUN_KEY": run_key(cfg), "TALLY_SEAL_KEY": seal_key(cfg), **control}
    if name == "acme":
        return {"TALLY_SEAL_KEY": seal_key(cfg), **control}
    return control


def run_key(cfg: Config) -> str:
    """The platform's key of run tickets (hex), the API's only (each host's is derived from
    it: ledger/tickets.py)."""
    from ledger.tickets import new_key

    return _kept_secret(cfg, "runs.key", lambda: new_key().hex())


def seal_key(cfg: Config) -> str:
    """The key the API seals apps' certificate keys with and balancers open them with."""
    from ledger.tls import new_seal_key

    return _kept_secret(cfg, "seal.key", new_seal_key)


def _kept_secret(cfg: Config, name: str, make: Callable[[], str]) -> str:
    """A secret made on first use, kept 0600 in $TALLY_HOME/secrets, readable by no app."""
    path = cfg.home / "secrets" / name
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(make() + "\n")
    return path.read_text().strip()


def host_token(cfg: Config, host_id: str, role: str) -> str:
    """The token of user <role>-<host> (an agent, a balancer, or builder <host>): made on
    first use, kept in $TALLY_HOME/secrets (0600). A lost file gets the user a new token;
    the old one keeps its hash only."""
    from api.auth import create_user, issue_token
    from ledger import Ledger

    path = cfg.home / "secrets" / f"{role}-{host_id}.token"
    if path.exists():
        return path.read_text().strip()
    name = f"{role}-{host_id}"
    with Ledger(cfg.cluster().dsn("tally_writer"), retry_deadline=10) as ledger:
        if ledger.stream_version(f"user-{name}") == 0:
            token = create_user(ledger, name, role, host_id, actor="tally up")
        else:
            token = issue_token(ledger, name, actor="tally up", label="reissued by tally up")
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


def first_admin(cfg: Config) -> tuple[str, Path] | None:
    """For `tally up`: if no admin exists yet, create one and log this machine's CLI in
    with it; its token (to show once) and the file it is saved in. None: one exists."""
    from api.auth import create_user, has_admin
    from ledger import Ledger

    with Ledger(cfg.cluster().dsn("tally_writer"), retry_deadline=10) as ledger:
        if has_admin(ledger):
            return None
        token = create_user(ledger, "admin", "admin", actor="tally up")
    return token, save_credentials(credentials_path(), f"http://{cfg.api_bind}", token,
                                   "admin")


def close_home(cfg: Config) -> None:
    """TALLY_HOME as apps on this machine meet it: they may pass through (to their own
    release and home under agents/, and the shared virtualenvs) but list nothing, and every
    folder of the platform's own state is closed to them. Who may read what: README,
    "Trust boundaries". The clusters close their own folders (ledger/cluster.py)."""
    cfg.home.mkdir(parents=True, exist_ok=True)
    cfg.home.chmod(0o711)
    for private in (cfg.run_dir, cfg.log_dir, cfg.app_logs_dir, cfg.bundles_dir,
                    cfg.build_logs_dir, cfg.home / "secrets"):
        private.mkdir(exist_ok=True)
        private.chmod(0o700)
    agents = cfg.home / "agents"
    agents.mkdir(exist_ok=True)
    agents.chmod(0o711)


ADDONS_PART = "addons"
"""supervisord's part for add-ons' services: the apps' cluster (etcd, Patroni, HAProxy) and
each app's Redis, so a killed one comes back without a person."""


def addon_programs(cfg: Config) -> list[Program]:
    """Every add-on service as it now is on disk, as supervisord's programs."""
    from agents import redisaddon

    apps = cfg.apps_cluster()
    processes = (apps.ha.processes() if isinstance(apps, PatroniCluster)
                 and apps.initialized() else [])
    return ledger_programs([*processes, *redisaddon.processes(cfg.redis_dir)], ADDONS_PART)


def supervise_addons(cfg: Config) -> None:
    supervise.up(cfg, addon_programs(cfg), {}, part=ADDONS_PART)


def apps_cluster(cfg: Config, supervised: bool) -> Cluster:
    """The apps' cluster; `supervised` (supervisord runs, as under `tally up`): its etcd,
    Patroni and HAProxy are supervisord's programs."""
    cluster = cfg.apps_cluster()
    if supervised and isinstance(cluster, PatroniCluster):
        cluster.launch = lambda _processes: supervise_addons(cfg)
    return cluster


def redis_launch(cfg: Config, supervised: bool) -> Callable[[], None] | None:
    """How Redis servers are run: by supervisord if `supervised`, else detached (None)."""
    return (lambda: supervise_addons(cfg)) if supervised else None


def start_addons(cfg: Config, supervised: bool = False) -> list[str]:
    """Start every service an add-on needs (made by the first add-on of its kind): the
    apps' database cluster with its stable address, each app's Redis; under supervisord
    if `supervised` (those started detached before, by the API, are handed over: stopped,
    then started by supervisord). What was started, for people."""
    from agents import redisaddon
    from agents.appsdb import address

    out = []
    apps = apps_cluster(cfg, supervised)
    if supervised:
        _hand_over(cfg, apps)
    if apps.initialized():
        apps.start()
        host, port = address(apps)
        out.append(f"apps' database cluster: {host}:{port} (every DATABASE_URL)")
    launch = redis_launch(cfg, supervised)
    for app in redisaddon.settle_restores(cfg.redis_dir):  # restores that were killed
        out.append(f"Redis of {app}: a restore that was cut short was settled")
    if launch is not None:
        launch()
    for app in redisaddon.apps(cfg.redis_dir):
        redisaddon.start(cfg.redis_dir, app, launch=(lambda: None) if launch else None)
    if redis := redisaddon.apps(cfg.redis_dir):
        out.append(f"Redis add-ons: {', '.join(redis)}")
    return out


def _hand_over(cfg: Config, apps: Cluster) -> None:
    """Stop the add-on services running detached (not as supervisord's programs)."""
    from agents import redisaddon

    ours = ({d["pid"] for d in supervise.status(cfg) if d["pid"]} if supervise.running(cfg)
            else set())
    if isinstance(apps, PatroniCluster) and apps.initialized():
        ha = apps.ha
        if any(pid not in ours for p in ha.processes() if (pid := ha.pid(p.name))):
            ha.stop()
    for app in redisaddon.apps(cfg.redis_dir):
        if redisaddon.pid(cfg.redis_dir, app) not in ours:
            redisaddon.stop(cfg.redis_dir, app)


def stop_addons(cfg: Config) -> None:
    """Stop what start_addons starts (`tally down`, after supervisord stopped its own)."""
    from agents import redisaddon

    redisaddon.stop_all(cfg.redis_dir)
    apps = cfg.apps_cluster()
    if apps.initialized():
        apps.stop()


UP_SUFFIX = "localhost"
"""`tally up`'s platform suffix: `http://blog.localhost:8080/` resolves with no DNS set up
(RFC 6761: *.localhost is the loopback)."""


def platform_suffix(cfg: Config, wanted: str | None = None, *, if_unset: bool = False) -> str:
    """The platform suffix the ledger records; with `wanted`, record it first
    (PlatformSuffixSet), unless `if_unset` and one is recorded already (an operator's
    choice survives `tally up`). Raises InvalidEvent for a name that is not a DNS name."""
    from ledger import Ledger, NewEvent
    from ledger.hostnames import PLATFORM_STREAM, current_suffix

    with Ledger(cfg.cluster().dsn("tally_writer"), retry_deadline=10) as ledger:
        events = ledger.read_stream(PLATFORM_STREAM)
        suffix = current_suffix((e.type, e.data) for e in events)
        recorded = any(e.type == "PlatformSuffixSet" for e in events)
        if wanted is None or wanted == suffix and recorded or if_unset and recorded:
            return suffix
        ledger.append(PLATFORM_STREAM, [NewEvent("PlatformSuffixSet", {"suffix": wanted}, {
            "actor": "operator", "role": "operator"})], expected_version=len(events))
        return wanted


def unconfined() -> list[str]:
    """What this machine lacks to confine apps, each said by `tally up` (the agents run
    apps anyway, and log the same)."""
    from agents import binds, cgroups, netrules

    return [f"  WARNING {what}: {reason}" for what, reason in (
        ("network reach", netrules.missing()), ("limits", cgroups.missing()),
        ("ports", binds.missing())) if reason]


def wait_ready(cfg: Config, timeout: float = 60.0) -> None:
    """Until the API answers /healthz, so `tally up` returns a platform one can use."""
    deadline = time.monotonic() + timeout
    url = f"http://{cfg.api_bind}/healthz"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise OSError(f"the API did not answer {url} within {timeout:.0f}s: "
                          f"see {cfg.log_dir / 'api.log'}")
        time.sleep(0.2)
