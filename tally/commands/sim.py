"""`tally sim --hosts N`: simulated host agents against a running platform's API, for an
operator sizing a control plane (agents/simulated.py; bench/fleet.py measures with it)."""

from __future__ import annotations

import json
import re
import time

import click

from ledger import Ledger
from tally.config import Config
from tally.console import fail_cleanly
from tally.simulation import host_ids, saved_tokens


def _prefix(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,19}", value):
        raise click.BadParameter("1-20 lowercase letters, digits and dashes, from a letter")
    return value


@click.command("sim")
@click.option("--hosts", "n", type=click.IntRange(1, 100_000), required=True,
              help="Simulated hosts.")
@click.option("--api", "api_url", help="The API (default: http://TALLY_API_BIND).")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=5.0,
              show_default=True, help="Seconds between a host's heartbeats.")
@click.option("--processes", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--duration", type=click.FloatRange(1, 86400), default=60.0,
              show_default=True, help="Seconds to run once every host registered.")
@click.option("--prefix", default="sim", show_default=True, callback=_prefix,
              help="Host ids are <prefix>00000, <prefix>00001...: another prefix, other hosts.")
@click.pass_obj
@fail_cleanly
def sim(cfg: Config, n: int, api_url: str | None, interval: float, processes: int,
        duration: float, prefix: str) -> None:
    """Run N simulated host agents (no app processes) over the real API: they register,
    heartbeat, read their desired state and report their instances started and
    healthy. Prints heartbeats/s accepted every 5 s, then one JSON line."""
    from agents.simulated import SimSettings, Simulation

    ids = host_ids(n, prefix)
    with Ledger(cfg.cluster().dsn("tally_writer"), retry_deadline=10) as ledger:
        tokens = saved_tokens(cfg, ledger, ids)
    simulation = Simulation(tokens, SimSettings(api_url or f"http://{cfg.api_bind}",
                                                interval), processes)
    started = time.monotonic()
    simulation.start()
    click.echo(f"{n} hosts registered in {time.monotonic() - started:.1f}s", err=True)
    begin, before = time.monotonic(), simulation.counts()
    last, last_at = before, begin
    try:
        while time.monotonic() - begin < duration:
            time.sleep(min(5.0, max(0.1, duration - (time.monotonic() - begin))))
            now, counts = time.monotonic(), simulation.counts()
            rate = (counts.heartbeats - last.heartbeats) / (now - last_at)
            click.echo(f"heartbeats/s {rate:8.0f}  refused {counts.refused}  failed "
                       f"{counts.failed}  reports {counts.reports}", err=True)
            last, last_at = counts, now
    finally:
        simulation.close()
    total = simulation.counts()
    elapsed = last_at - begin
    click.echo(json.dumps({
        "hosts": n, "interval_s": interval, "seconds": round(elapsed, 1),
        "heartbeats_per_s": round((total.heartbeats - before.heartbeats) / elapsed, 1),
        "offered_per_s": round(n / interval, 1), "refused": total.refused,
        "failed": total.failed, "reports": total.reports}))


COMMANDS = [sim]
