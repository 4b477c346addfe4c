"""`tally serve agent|builder`: the daemons of a fleet host (operator commands, run on the
host they serve), each speaking to the API only, with its own token."""

from __future__ import annotations

from pathlib import Path

import click

from tally.config import Config, agent_token, builder_token
from tally.console import daemon_logging, fail_cleanly, host_token, stop_event


@click.command("agent")
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
              help="The API this host speaks to (default: http://TALLY_API_BIND). The "
              "agent holds no ledger credentials: it reads its desired state and "
              "bundles, and reports, through the API only.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding this host's agent token (default: the token in "
              "TALLY_AGENT_TOKEN). Issue one with `tally admin create-user NAME "
              "--role agent --host HOST`.")
@click.option("--backend-clients", envvar="TALLY_BACKEND_CLIENTS", default="",
              help="Addresses or networks (comma-separated) of other hosts that may "
              "connect to this host's app ports: the balancers, when they run elsewhere. "
              "By default only this host may (nftables; connections to the app ports "
              "are accepted at --address only).")
@click.option("--stop-apps-on-exit", is_flag=True,
              help="Stop this host's instances when the agent stops (one-machine "
              "setups); by default they keep running and the next agent adopts them.")
@click.pass_obj
@fail_cleanly
def serve_agent(cfg: Config, host_id: str, address: str, port_range: str, capacity: int,
                heartbeat: float, grace: float, health_every: float,
                cleanup_every: float, memory_mb: int, open_files: int,
                api_url: str | None, token_file: Path | None, backend_clients: str,
                stop_apps_on_exit: bool) -> None:
    """Run this host's placed instances, report them, heartbeat: all through the API,
    with this host's agent token."""
    from agents.api_client import ApiRefused, HostApi
    from agents.host import Agent, HostSpec, Paths, Timing
    from agents.processes import Limits

    daemon_logging()
    low, high = _port_range(port_range)
    token = _agent_token(token_file)
    api = api_url or f"http://{cfg.api_bind}"
    try:
        client = HostApi(api, token, host_id)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--api") from None
    spec = HostSpec(host_id, address, low, high, capacity,
                    addon_ports=cfg.addon_ports, user_prefix=cfg.app_user_prefix,
                    backend_clients=tuple(c.strip() for c in backend_clients.split(",")
                                          if c.strip()))
    paths = Paths(state=cfg.home / "agents" / host_id, bundles=cfg.bundles_dir,
                  releases=cfg.home / "agents" / host_id / "releases",
                  api=api, api_token=token)
    stop = stop_event()
    try:
        Agent(client, spec, paths, Timing(heartbeat=heartbeat, grace=grace,
                                          health_every=health_every,
                                          cleanup_every=cleanup_every),
              Limits(open_files=open_files, memory_mb=memory_mb),
              collector=cfg.collector, collector_key=cfg.collector_key()).run(
            stop, cfg.relays, stop_apps=stop_apps_on_exit, relay_key=cfg.relay_key)
    except ApiRefused as exc:  # e.g. a token of another host: say so, exit 1
        raise click.ClickException(f"the API refused this agent: {exc}") from None


@click.command("builder")
@click.option("--api", "api_url", envvar="TALLY_BUILDER_API",
              help="The API this builder speaks to (default: http://TALLY_API_BIND). The "
              "builder holds no ledger credentials and reads no bundle store: it claims "
              "builds, fetches bundles and uploads slugs through the API only.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding this builder's token (default: TALLY_BUILDER_TOKEN). "
              "Issue one with `tally admin create-user NAME --role builder --host "
              "BUILDER`; claims carry that BUILDER name.")
@click.option("--timeout", default=900.0, show_default=True,
              help="Seconds a build may take.")
@click.option("--memory-mb", default=2048, show_default=True,
              help="Memory a build may use (cgroup v1, when writable).")
@click.option("--processes", default=256, show_default=True,
              help="Processes a build may run at once (cgroup v1 pids).")
@click.option("--disk-mb", default=2048, show_default=True,
              help="Disk a build may fill (build folder, /tmp, its cache).")
@click.option("--lease", default=30.0, show_default=True,
              help="Seconds a claim lasts unless renewed (another builder takes over a "
              "dead builder's build after this).")
@click.option("--network", type=click.Choice(["index", "host", "none"]), default="index",
              show_default=True, help="The build's network: the package index only "
              "(nftables rules for the build's uid; the host's, with a warning, where "
              "nftables cannot be used), the host's, or none (a local index only).")
@click.option("--index-host", "index_hosts", multiple=True,
              help="A host of a package index builds may reach, besides PyPI's and the "
              "index URLs pip is configured with (repeatable).")
@click.option("--concurrency", default=1, show_default=True,
              help="Builds this builder runs at once.")
@click.option("--interval", default=0.5, show_default=True,
              help="Seconds between asks for builds to claim.")
@click.pass_obj
@fail_cleanly
def serve_builder(cfg: Config, api_url: str | None, token_file: Path | None, timeout: float,
                  memory_mb: int, processes: int, disk_mb: int, lease: float, network: str,
                  index_hosts: tuple[str, ...], concurrency: int, interval: float) -> None:
    """Build each release once, in a sandbox, into a slug every host runs: through the
    API, with this builder's token."""
    from agents.api_client import BuilderApi
    from agents.builder import Builder, Settings
    from agents.sandbox import Limits, SandboxUnavailable

    daemon_logging()
    token = host_token(token_file, builder_token(), "a builder needs its builder token: "
                       "--token-file or TALLY_BUILDER_TOKEN (tally admin create-user NAME "
                       "--role builder --host BUILDER)")
    try:
        api = BuilderApi(api_url or f"http://{cfg.api_bind}", token, "builder")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--api") from None
    stop = stop_event()
    settings = Settings(cfg.build_dir, Limits(timeout, memory_mb, processes, disk_mb),
                        lease, network, concurrency, index_hosts)
    try:
        builder = Builder(api, settings)
    except SandboxUnavailable as exc:
        raise click.ClickException(f"cannot build here: {exc}") from None
    builder.run(stop, interval)


def _agent_token(token_file: Path | None) -> str:
    """The host's agent token, from --token-file or TALLY_AGENT_TOKEN."""
    return host_token(token_file, agent_token(), "an agent needs its host's agent token: "
                      "--token-file or TALLY_AGENT_TOKEN (tally admin create-user NAME "
                      "--role agent --host HOST)")


def _port_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(p) for p in text.split("-"))
    except ValueError:
        raise click.BadParameter("must look like 7000-7099", param_hint="--port-range") from None
    if not 1 <= low <= high <= 65535:
        raise click.BadParameter("must be A-B with 1 <= A <= B <= 65535",
                                 param_hint="--port-range")
    return low, high
