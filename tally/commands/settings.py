"""`tally scale`, `config`, `config:set|unset`, `domains`, `domains:add|remove`,
`maintenance:on|off`: what a developer sets on an app (over the API)."""

from __future__ import annotations

from typing import Any

import click

from tally.client import Client, ClientError
from tally.commands.args import app_option, parse_pairs
from tally.commands.http import doing, emit, http_command
from tally.console import cell


@http_command("scale")
@app_option
@click.argument("pairs", nargs=-1, required=True)
def scale(client: Client, app: str, pairs: tuple[str, ...]) -> None:
    """Set instances per process type, and their size if given:
    `tally scale -a blog web=2:standard-2x worker=1` (sizes: basic, standard-1x (default),
    standard-2x, performance-m, performance-l)."""
    wanted, sizes = {}, {}
    for key, value in parse_pairs(pairs, "TYPE").items():
        count, _, size = value.partition(":")
        if not count.isdigit():
            raise ClientError(f"{key}={value}: the count must be a whole number")
        wanted[key] = int(count)
        if size:
            sizes[key] = size
    shown = " ".join(pairs)
    doing(f"Scaling {app}: {shown}",
          lambda: client.post(f"/apps/{app}/scale", {"scale": wanted, "sizes": sizes}),
          lambda a: f"done, now {cell(a['scale'])}")


@http_command("config", json_output=True)
@app_option
def config(client: Client, app: str, as_json: bool) -> None:
    """The app's config vars with their values."""
    def text(c: dict[str, str]) -> None:
        for k in sorted(c):
            click.echo(f"{k}={c[k]}")
    emit(client.get(f"/apps/{app}/config")["config"], as_json, text)


@http_command("config:set")
@app_option
@click.argument("pairs", nargs=-1, required=True)
def config_set(client: Client, app: str, pairs: tuple[str, ...]) -> None:
    """Set config vars (a new release): `tally config:set -a blog KEY=value ...`."""
    values = parse_pairs(pairs, "KEY")
    _config_change(client, app, f"Setting {', '.join(values)}", {"set": values})


@http_command("config:unset")
@app_option
@click.argument("keys", nargs=-1, required=True)
def config_unset(client: Client, app: str, keys: tuple[str, ...]) -> None:
    """Unset config vars (a new release): `tally config:unset -a blog KEY ...`."""
    _config_change(client, app, f"Unsetting {', '.join(keys)}", {"unset": list(keys)})


@http_command("domains", json_output=True)
@app_option
def domains(client: Client, app: str, as_json: bool) -> None:
    """The app's hostnames."""
    def text(ds: list[str]) -> None:
        for d in ds:
            click.echo(d)
    emit(client.get(f"/apps/{app}/domains")["domains"], as_json, text)


@http_command("domains:add")
@app_option
@click.argument("domain")
def domains_add(client: Client, app: str, domain: str) -> None:
    """Route a hostname (or `*.suffix`) to the app:
    `tally domains:add -a blog www.example.com`."""
    doing(f"Adding {domain} to {app}",
          lambda: client.post(f"/apps/{app}/domains", {"domain": domain}))


@http_command("domains:remove")
@app_option
@click.argument("domain")
def domains_remove(client: Client, app: str, domain: str) -> None:
    """Stop routing a hostname to the app:
    `tally domains:remove -a blog www.example.com`."""
    doing(f"Removing {domain} from {app}",
          lambda: client.request("DELETE", f"/apps/{app}/domains/{domain}"))


def _config_change(client: Client, app: str, what: str, change: dict[str, Any]) -> None:
    """A config change, confirmed with the release it made (none before the first deploy)."""
    def done(c: dict[str, Any]) -> str:
        return f"done, v{c['release']}" if c.get("release") else "done"
    restarting = client.get(f"/apps/{app}").get("release") is not None
    doing(f"{what} and restarting {app}" if restarting else f"{what} for {app}",
          lambda: client.request("PATCH", f"/apps/{app}/config", json=change), done)


def _maintenance(state: str, enabled: bool) -> click.Command:
    @http_command(f"maintenance:{state}")
    @app_option
    def maintenance(client: Client, app: str) -> None:
        """Switch maintenance mode (the balancers answer 503 with a page):
        `tally maintenance:on -a blog`."""
        doing(f"{'Enabling' if enabled else 'Disabling'} maintenance mode for {app}",
              lambda: client.request("PUT", f"/apps/{app}/maintenance",
                                     json={"enabled": enabled}))
    return maintenance


maintenance_on = _maintenance("on", True)
maintenance_off = _maintenance("off", False)

COMMANDS = [scale, config, config_set, config_unset, domains, domains_add, domains_remove,
            maintenance_on, maintenance_off]
