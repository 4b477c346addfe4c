"""`tally sim --hosts N`: simulated host agents against a running platform's API, for an
operator sizing a control plane (agents/simulated.py; bench/fleet.py measures with it)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import click

from ledger import Ledger, NewEvent
from tally.config import Config


def issue_tokens(ledger: Ledger, host_ids: Sequence[str], prefix: str = "sim") -> dict[str, str]:
    """An agent user `<prefix>-<host>` with a token per simulated host, appended a thousand
    users per transaction (the operator's path, as `tally admin create-user` is)."""
    from api.auth import user_events
    from ledger.batch import Item, append_streams

    tokens: dict[str, str] = {}
    meta = {"actor": "tally sim", "role": "operator"}
    for i in range(0, len(host_ids), 1000):
        items = []
        for host in host_ids[i:i + 1000]:
            token, events = user_events(f"{prefix}-{host}", "agent", host, label="tally sim")
            tokens[host] = token
            items += [Item(f"user-{prefix}-{host}", NewEvent(e.type, e.data, meta),
                           f"sim-{os.urandom(8).hex()}") for e in events]
        append_streams(ledger, items)
    return tokens


def saved_tokens(cfg: Config, ledger: Ledger, host_ids: Sequence[str]) -> dict[str, str]:
    """Tokens kept in $TALLY_HOME/secrets/sim-tokens.json (0600); missing ones issued."""
    path = cfg.home / "secrets" / "sim-tokens.json"
    known: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [h for h in host_ids if h not in known]
    if missing:
        known.update(issue_tokens(ledger, missing))
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps(known))
    return {h: known[h] for h in host_ids}


def host_ids(n: int, prefix: str = "sim") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def register(cli: click.Group) -> None:
    from tally.console import fail_cleanly

    @cli.command("sim")
    @click.option("--hosts", "n", type=click.IntRange(1, 100_000), required=True,
                  help="Simulated hosts.")
    @click.option("--api", "api_url", help="The API (default: http://TALLY_API_BIND).")
    @click.option("--interval", type=click.FloatRange(0.1, 3600), default=5.0,
                  show_default=True, help="Seconds between a host's heartbeats.")
    @click.option("--processes", type=click.IntRange(1, 64), default=2, show_default=True)
    @click.option("--duration", type=click.FloatRange(1, 86400), default=60.0,
                  show_default=True, help="Seconds to run once every host registered.")
    @click.pass_obj
    @fail_cleanly
    def sim(cfg: Config, n: int, api_url: str | None, interval: float, processes: int,
            duration: float) -> None:
        """Run N simulated host agents (no app processes) over the real API: they register,
        heartbeat, read their desired state and report their instances started and
        healthy. Prints heartbeats/s accepted every 5 s, then one JSON line."""
        from agents.simulated import SimSettings, Simulation

        ids = host_ids(n)
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

