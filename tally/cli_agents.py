"""`tally serve placer|agent|collector` and the commands that reach app processes."""

from __future__ import annotations

import os

import click

from ledger import VersionConflict
from tally.config import Config
from tally.console import daemon_logging, fail_cleanly, stop_event


def register(cli: click.Group) -> None:
    """Add this module's commands to the `tally` group."""
    serve = cli.commands["serve"]
    assert isinstance(serve, click.Group)

    @serve.command("placer")
    @click.option("--ttl", default=15.0, show_default=True, envvar="TALLY_HOST_TTL",
                  help="Seconds without a heartbeat before a host is lost.")
    @click.option("--suspect-after", default=5.0, show_default=True,
                  help="Seconds without a heartbeat before a host gets nothing new.")
    @click.option("--deploy-timeout", default=120.0, show_default=True,
                  envvar="TALLY_DEPLOY_TIMEOUT",
                  help="Seconds a new release has to become healthy before it fails.")
    @click.option("--interval", default=1.0, show_default=True,
                  help="Seconds between reconciles when no wake-up comes.")
    @click.pass_obj
    @fail_cleanly
    def serve_placer(cfg: Config, ttl: float, suspect_after: float, deploy_timeout: float,
                     interval: float) -> None:
        """Place app instances on alive hosts, replace lost ones, roll releases out."""
        from agents.placement import Settings
        from agents.placer import Placer
        from ledger import Ledger

        daemon_logging()
        if not 0 < suspect_after < ttl:
            raise click.BadParameter("must be above 0 and below --ttl",
                                     param_hint="--suspect-after")
        stop = stop_event()
        settings = Settings(ttl=ttl, suspect_after=suspect_after,
                            deploy_timeout=deploy_timeout)
        with Ledger(cfg.cluster().dsn("tally_writer")) as ledger:
            Placer(ledger, settings).run(stop, cfg.relays, interval)

    @serve.command("agent")
    @click.option("--host-id", required=True, help="This host's name in the fleet.")
    @click.option("--address", default="127.0.0.1", show_default=True,
                  help="Address instances bind and balancers reach.")
    @click.option("--port-range", default="7000-7099", show_default=True,
                  help="Ports the placer may give this host's instances, A-B.")
    @click.option("--capacity", default=20, show_default=True,
                  help="Instances this host runs at most (memory slots).")
    @click.option("--heartbeat", default=2.0, show_default=True, help="Seconds.")
    @click.option("--grace", default=10.0, show_default=True,
                  help="Seconds between SIGTERM and SIGKILL when stopping an instance.")
    @click.option("--health-every", default=5.0, show_default=True,
                  help="Seconds between health checks of a healthy web instance; three "
                  "failures in a row and it is killed and restarted.")
    @click.option("--cleanup-every", default=60.0, show_default=True,
                  help="Seconds between removals of unused releases (all but the ones in "
                  "use, current, deployed and 3 newest) and of what deleted apps left.")
    @click.option("--memory-mb", default=1024, show_default=True,
                  help="Address-space limit per instance.")
    @click.option("--open-files", default=4096, show_default=True,
                  help="Open files limit per instance.")
    @click.option("--api", "api_url", envvar="TALLY_AGENT_API",
                  help="Download bundles from this API with the agent token in "
                  "TALLY_AGENT_TOKEN (default: http://TALLY_API_BIND when a token is set; "
                  "without a token, bundles are read from $TALLY_HOME/bundles).")
    @click.option("--stop-apps-on-exit", is_flag=True,
                  help="Stop this host's instances when the agent stops (one-machine "
                  "setups); by default they keep running and the next agent adopts them.")
    @click.pass_obj
    @fail_cleanly
    def serve_agent(cfg: Config, host_id: str, address: str, port_range: str, capacity: int,
                    heartbeat: float, grace: float, health_every: float,
                    cleanup_every: float, memory_mb: int, open_files: int,
                    api_url: str | None, stop_apps_on_exit: bool) -> None:
        """Run this host's placed instances, report them, heartbeat."""
        from agents.host import Agent, HostSpec, Paths, Timing
        from agents.processes import Limits
        from ledger import Ledger

        daemon_logging()
        low, high = _port_range(port_range)
        spec = HostSpec(host_id, address, low, high, capacity)
        paths = Paths(state=cfg.home / "agents" / host_id, bundles=cfg.bundles_dir,
                      releases=cfg.home / "agents" / host_id / "releases",
                      venvs=cfg.venv_cache, python=cfg.app_python,
                      api=api_url or f"http://{cfg.api_bind}",
                      api_token=os.environ.get("TALLY_AGENT_TOKEN", ""))
        stop = stop_event()
        with Ledger(cfg.cluster().dsn("tally_writer")) as ledger:
            Agent(ledger, spec, paths, Timing(heartbeat=heartbeat, grace=grace,
                                              health_every=health_every,
                                              cleanup_every=cleanup_every),
                  Limits(open_files=open_files, memory_mb=memory_mb),
                  collector=cfg.collector).run(
                stop, cfg.relays, stop_apps=stop_apps_on_exit)

    @serve.command("collector")
    @click.option("--bind", help="ZeroMQ PULL endpoint (default: TALLY_COLLECTOR).")
    @click.option("--chunk-mb", default=1.0, show_default=True,
                  help="Rotate an app's current log file past this size.")
    @click.pass_obj
    @fail_cleanly
    def serve_collector(cfg: Config, bind: str | None, chunk_mb: float) -> None:
        """Receive app logs from the host agents and write them to chunked files per app."""
        from agents.logs import Collector

        daemon_logging()
        stop = stop_event()
        Collector(cfg.app_logs_dir, int(chunk_mb * 2**20)).run(bind or cfg.collector, stop)

    @cli.command("logs")
    @click.argument("app_arg", metavar="[APP]", required=False)
    @click.option("-a", "--app", "app", envvar="TALLY_APP", help="The app (or TALLY_APP).")
    @click.option("-n", "--lines", default=100, show_default=True, help="Lines to show.")
    @click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
    @click.pass_obj
    @fail_cleanly
    def logs(cfg: Config, app_arg: str | None, app: str | None, lines: int,
             follow: bool) -> None:
        """An app's logs, as the collector wrote them (run where the collector runs):
        `tally logs -a blog -f` (or `tally logs blog`)."""
        app = app_arg or app
        if not app:
            raise click.UsageError("which app? give -a APP (or TALLY_APP)")
        from agents import logs as applogs

        for line in applogs.tail(cfg.app_logs_dir, app, lines):
            click.echo(line)
        if follow:
            stop = stop_event()
            for line in applogs.follow(cfg.app_logs_dir, app, stop):
                click.echo(line)

    @cli.command("run", context_settings={"ignore_unknown_options": True,
                                          "allow_interspersed_args": False})
    @click.option("-a", "--app", "app", envvar="TALLY_APP", help="The app (or TALLY_APP).")
    @click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
    @click.pass_obj
    @fail_cleanly
    def run(cfg: Config, app: str | None, command: tuple[str, ...]) -> None:
        """Run a one-off command in the app's environment on a host, in a pty:
        `tally run -a blog -- python manage.py migrate` (or `tally run blog -- ...`).
        Exits with the command's code; Ctrl-C interrupts it."""
        import sys
        from datetime import UTC, datetime

        from agents.fleet import Fleet
        from agents.placer import catch_up
        from agents.runs import RunError, run_remote
        from ledger import Ledger
        from ledger.vocabulary import HostState

        explicit = (click.get_current_context().get_parameter_source("app")
                    is click.core.ParameterSource.COMMANDLINE)
        app, argv = _app_and_command(app, command, explicit)
        fleet = Fleet()
        with Ledger(cfg.cluster().dsn("tally_reader")) as ledger:
            catch_up(ledger, fleet, ["app", "host", "heartbeat", "placement", "placer"],
                     sequence=False)
        if app not in fleet.apps:
            raise click.ClickException(f"no app named {app!r}")
        now = datetime.now(UTC)
        # A host that runs the app first: it has the release unpacked, and an agent
        # fetching bundles through the API is only given those of releases placed on it.
        placed = {p.host_id for p in fleet.placements_of(app)}
        hosts = sorted((h for h in fleet.hosts.values() if h.run_endpoint and h.last_heartbeat
                        and h.state(now, fleet.liveness) in (HostState.ALIVE,
                                                             HostState.SUSPECT)),
                       key=lambda h: (h.host_id in placed, h.last_heartbeat or now),
                       reverse=True)
        if not hosts:
            raise click.ClickException("no alive host agent to run the command on")
        try:
            code = run_remote(hosts[0].run_endpoint, app, argv, sys.stdout.buffer)
        except RunError as exc:
            raise click.ClickException(str(exc)) from exc
        sys.exit(code)

    @cli.command("addons:create")
    @click.argument("app")
    @click.argument("kind", type=click.Choice(["postgresql"]))
    @click.pass_obj
    @fail_cleanly
    def addons_create(cfg: Config, app: str, kind: str) -> None:
        """Give APP a PostgreSQL database in the apps cluster; sets DATABASE_URL (a new
        release)."""
        from agents import addons
        from api import decide
        from api.state import fold
        from ledger import Ledger

        with Ledger(cfg.cluster().dsn("tally_writer")) as ledger:
            state = fold(app, ledger.read_stream(f"app-{app}"))
            if not state.exists:
                raise click.ClickException(f"no app named {app!r}")
            if "DATABASE_URL" in state.config:
                raise click.ClickException(f"{app} already has a DATABASE_URL")
            cluster = cfg.apps_cluster()
            addons.ensure_cluster(cluster)
            try:
                url = addons.create_database(cluster, app)
            except addons.AddonError as exc:
                raise click.ClickException(str(exc)) from exc
            for _ in range(5):  # the API may append to the app's stream meanwhile
                state = fold(app, ledger.read_stream(f"app-{app}"))
                try:
                    ledger.append(f"app-{app}", decide.change_config(
                        state, {"DATABASE_URL": url}, []), expected_version=state.version)
                    break
                except VersionConflict:
                    continue
            else:
                raise click.ClickException("the app kept changing: try again")
        click.echo(f"created database {addons.database_name(app)} for {app}; DATABASE_URL "
                   f"is set", err=True)


def _app_and_command(app: str | None, words: tuple[str, ...],
                     explicit: bool = False) -> tuple[str, list[str]]:
    """`run`'s app and command from `-a APP [--] CMD...` (explicit: all words are the
    command) or `APP -- CMD...` (the app named before `--` wins over TALLY_APP)."""
    if explicit:
        argv = list(words[1:] if words[:1] == ("--",) else words)
    elif "--" in words:
        cut = words.index("--")
        before, argv = words[:cut], list(words[cut + 1:])
        if len(before) == 1:
            app = before[0]
        elif before:
            raise click.UsageError("put the command after --: tally run -a APP -- CMD")
    else:
        argv = list(words)
        if app is None and argv:
            app = argv.pop(0)
    if not app or not argv:
        raise click.UsageError("give the app and the command: tally run -a APP -- CMD")
    return app, argv


def _port_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(p) for p in text.split("-"))
    except ValueError:
        raise click.BadParameter("must look like 7000-7099", param_hint="--port-range") from None
    if not 1 <= low <= high <= 65535:
        raise click.BadParameter("must be A-B with 1 <= A <= B <= 65535",
                                 param_hint="--port-range")
    return low, high
