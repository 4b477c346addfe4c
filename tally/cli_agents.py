"""`tally serve placer|agent|collector` and the commands that reach app processes."""

from __future__ import annotations

import logging
import signal
import threading

import click

from tally.config import Config


def _stop_event() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def register(cli: click.Group) -> None:
    """Add this module's commands to the `tally` group."""
    from tally.cli import fail_cleanly

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

        _logging()
        if not 0 < suspect_after < ttl:
            raise click.BadParameter("must be above 0 and below --ttl",
                                     param_hint="--suspect-after")
        stop = _stop_event()
        settings = Settings(ttl=ttl, suspect_after=suspect_after,
                            deploy_timeout=deploy_timeout)
        with Ledger(cfg.cluster().dsn("tally_writer")) as ledger:
            Placer(ledger, settings).run(stop, cfg.relays, interval)
