"""`tally serve balancer`: the HTTP/1.1 load balancer in front of every app; and `tally serve
acme`, which gets apps' domains their certificates over ACME."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tally.config import Config, balancer_token, seal_key_from_env
from tally.console import fail_cleanly, host_token


def _token(token_file: Path | None) -> str:
    """The balancer's token, from --token-file or TALLY_BALANCER_TOKEN (the API gives the
    routes to no one else)."""
    return host_token(token_file, balancer_token(), "a balancer needs its token: "
                      "--token-file or TALLY_BALANCER_TOKEN (tally admin create-user NAME "
                      "--role balancer --host ID), or routes from a file: --routes FILE")


def _address(text: str, option: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter("must be HOST:PORT", param_hint=option)
    return host.strip("[]"), int(port)


@click.command("balancer")
@click.option("--bind", default="127.0.0.1:8080", show_default=True,
              help="HOST:PORT to listen on.")
@click.option("--routes", "routes_file", type=click.Path(dir_okay=False),
              help="Standalone mode: routes from this JSON file (re-read when it "
                   "changes) instead of the API.")
@click.option("--api", "api_url", envvar="TALLY_BALANCER_API",
              help="The API giving the routes (default: http://TALLY_API_BIND). The "
                   "balancer holds no ledger credentials, only its balancer token.")
@click.option("--balancer-id", default="b1", show_default=True,
              help="The balancer host its token is bound to.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding this balancer's token (default: TALLY_BALANCER_TOKEN). "
                   "Issue one with `tally admin create-user NAME --role balancer --host ID`.")
@click.option("--processes", default=1, show_default=True,
              help="Processes sharing the port (SO_REUSEPORT).")
@click.option("--policy", type=click.Choice(["round-robin", "least-connections"]),
              default="round-robin", show_default=True)
@click.option("--hold", default=15.0, show_default=True,
              help="Seconds a request waits for a healthy backend before 503.")
@click.option("--max-body-mb", default=1024.0, show_default=True,
              help="Largest request body (413 above).")
@click.option("--idle-timeout", default=60.0, show_default=True, help="Seconds.")
@click.option("--header-timeout", default=10.0, show_default=True, help="Seconds.")
@click.option("--connect-timeout", default=3.0, show_default=True, help="Seconds.")
@click.option("--backend-timeout", default=60.0, show_default=True,
              help="Seconds of backend silence before 504.")
@click.option("--cooldown", default=2.0, show_default=True,
              help="Seconds a failing backend is left out (passive health).")
@click.option("--drain", default=30.0, show_default=True,
              help="Seconds in-flight requests get to finish on SIGTERM.")
@click.option("--admin", help="HOST:PORT for /metrics and /healthz (off by default).")
@click.option("--stats-every", default=10.0, show_default=True,
              help="Seconds between router samples sent to the API (for `tally stats`).")
@click.option("--collector", help="Ship the access log to this log collector endpoint "
                                  "(default: TALLY_COLLECTOR, none with --routes).")
@click.option("--tls-bind", help="HOST:PORT to terminate TLS on, with the apps' certificates "
                                 "(their keys opened with TALLY_SEAL_KEY) and --certs "
                                 "(standalone mode: --certs only).")
@click.option("--certs", type=click.Path(file_okay=False),
              help="Folder of NAME.crt + NAME.key pairs (NAME: a hostname, *.suffix or "
                   "default), chosen by SNI; re-read when it changes.")
@click.pass_obj
@fail_cleanly
def serve_balancer(cfg: Config, bind: str, routes_file: str | None, api_url: str | None,
                   balancer_id: str, token_file: Path | None, processes: int,
                   policy: str, hold: float, max_body_mb: float, idle_timeout: float,
                   header_timeout: float, connect_timeout: float, backend_timeout: float,
                   cooldown: float, drain: float, admin: str | None, stats_every: float,
                   collector: str | None, tls_bind: str | None,
                   certs: str | None) -> None:
    """Route HTTP by Host header to apps' healthy instances (from the routes view through
    the API, or from --routes FILE)."""
    from balancer.h1 import Limits
    from balancer.routing import Settings
    from balancer.serve import Options, main
    from balancer.shell import Timeouts

    if certs and not tls_bind:
        raise click.BadParameter("certificates need --tls-bind", param_hint="--certs")
    if routes_file and tls_bind and not certs:
        raise click.BadParameter("standalone mode takes its certificates from --certs",
                                 param_hint="--tls-bind")
    if certs:
        from balancer.tls import Certificates

        Certificates(certs)  # a folder with no usable certificate: say so now
    if processes < 1:
        raise click.BadParameter("must be at least 1", param_hint="--processes")
    options = Options(
        bind=_address(bind, "--bind"), routes_file=routes_file,
        api=None if routes_file else api_url or f"http://{cfg.api_bind}",
        token="" if routes_file else _token(token_file), balancer_id=balancer_id,
        relays=() if routes_file else cfg.relays, processes=processes,
        settings=Settings(policy=policy, cooldown=cooldown),
        limits=Limits(max_body=int(max_body_mb * 1024 * 1024)),
        timeouts=Timeouts(idle=idle_timeout, header=header_timeout,
                          connect=connect_timeout, backend=backend_timeout, hold=hold),
        drain=drain, admin=_address(admin, "--admin") if admin else None,
        collector=collector or (None if routes_file else cfg.collector),
        collector_curve=_collector_curve(cfg),
        tls_bind=_address(tls_bind, "--tls-bind") if tls_bind else None, certs=certs,
        seal_key=seal_key_from_env(), stats_every=stats_every,
        cache=None if routes_file else str(
            cfg.run_dir / f"balancer-{_address(bind, '--bind')[1]}.routes.json"),
        static_dir=None if routes_file else str(
            cfg.run_dir / f"balancer-{_address(bind, '--bind')[1]}.static"),
    )
    raise SystemExit(main(options))


def _collector_curve(cfg: Config) -> Any:
    """The balancer ships its access log over CURVE with the control plane's keypair
    (TALLY_CURVE_KEYFILE, which `tally up` gives it); without one, plain (a collector
    serving CURVE then refuses it)."""
    if not cfg.curve_keyfile:
        return None
    from ledger import curve

    return curve.Client(cfg.collector_key(), curve.load_or_create(Path(cfg.curve_keyfile)))


@click.command("acme")
@click.option("--directory", envvar="TALLY_ACME_DIRECTORY", required=True,
              help="The ACME directory URL (e.g. Let's Encrypt's; pebble's in tests).")
@click.option("--ca-bundle", type=click.Path(dir_okay=False),
              help="Trust this CA file for the directory's HTTPS (a test CA's).")
@click.option("--balancer", "balancers", multiple=True,
              help="HOST:PORT of a balancer checked to answer each challenge before the CA "
                   "is asked to validate (default: TALLY_BALANCERS).")
@click.option("--every", default=60.0, show_default=True,
              help="Seconds between looks at what is due.")
@click.option("--renew-before-days", default=30.0, show_default=True,
              help="Renew a certificate this long before it ends.")
@click.option("--retry-after-minutes", default=10.0, show_default=True,
              help="Wait this long after a failed order before ordering that name again.")
@click.pass_obj
@fail_cleanly
def serve_acme(cfg: Config, directory: str, ca_bundle: str | None,
               balancers: tuple[str, ...], every: float, renew_before_days: float,
               retry_after_minutes: float) -> None:
    """Certificates for apps' domains over ACME (HTTP-01, answered by the balancers),
    renewed before they expire; each step an event in the app's stream."""
    from datetime import timedelta

    from agents.acme import AcmeAgent, Settings, balancers_of
    from ledger import Ledger
    from tally.console import daemon_logging, stop_event

    daemon_logging()
    seal_key = seal_key_from_env()
    if seal_key is None:
        raise click.UsageError("the ACME agent seals the keys it makes: set TALLY_SEAL_KEY")
    try:
        checked = balancers_of(balancers or cfg.balancers)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--balancer") from None
    settings = Settings(directory, cfg.secret("acme-account.key"), seal_key, ca_bundle,
                        checked, timedelta(days=renew_before_days),
                        timedelta(minutes=retry_after_minutes), every)
    stop = stop_event()
    with Ledger(cfg.cluster().dsn("tally_writer")) as ledger:
        AcmeAgent(ledger, settings).run(stop)
