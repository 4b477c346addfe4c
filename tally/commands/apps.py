"""`tally apps`, `apps:create|info|delete`, `access:add|remove`, `ps`, `stats`: apps, who
manages them, and what runs of them (over the API)."""

from __future__ import annotations

from typing import Any

import click

from tally.client import Client, ClientError
from tally.commands.args import app_and_arg, app_arg, app_option
from tally.commands.http import doing, emit, http_command
from tally.console import cell, table


@http_command("apps", json_output=True)
def apps(client: Client, as_json: bool) -> None:
    """The apps you may manage."""
    emit(client.get("/apps")["apps"], as_json, lambda rows: table(
        rows, ["name", "owner", "release", "scale", "domains", "maintenance"],
        "no apps yet: create one with `tally apps:create NAME`"))


@http_command("apps:create")
@app_arg
def apps_create(client: Client, app: str | None, app_arg: str | None) -> None:
    """Create an app (3-30 lowercase letters, digits, dashes): `tally apps:create blog`."""
    name = app_and_arg(app, app_arg)
    doing(f"Creating {name}", lambda: client.post("/apps", {"name": name}),
          lambda a: f"done, {a['web_url']}" if a.get("web_url") else "done")


@http_command("apps:info", json_output=True)
@app_arg
def apps_info(client: Client, app: str | None, app_arg: str | None, as_json: bool) -> None:
    """One app: release, scale, domains, members: `tally apps:info -a blog`."""
    name = app_and_arg(app, app_arg)

    def text(a: dict[str, Any]) -> None:
        for key in ("name", "web_url", "owner", "members", "release", "scale", "domains",
                    "maintenance", "created_at"):
            click.echo(f"{key + ':':13} {cell(a.get(key))}")
    emit(client.get(f"/apps/{name}"), as_json, text)


@http_command("apps:delete")
@app_arg
@click.option("--confirm", help="The app's name again, to confirm.")
def apps_delete(client: Client, app: str | None, app_arg: str | None,
                confirm: str | None) -> None:
    """Delete an app: everything stops, the history stays:
    `tally apps:delete -a blog --confirm blog`."""
    name = app_and_arg(app, app_arg)
    if confirm != name:
        raise ClientError(f"this stops every process of {name}: "
                          f"repeat with --confirm {name}")
    doing(f"Destroying {name} (its processes stop, its history stays)",
          lambda: client.request("DELETE", f"/apps/{name}"))


@http_command("access:add")
@app_option
@click.argument("user")
def access_add(client: Client, app: str, user: str) -> None:
    """Let another user manage the app: `tally access:add -a blog bob`."""
    doing(f"Adding {user} to {app}",
          lambda: client.post(f"/apps/{app}/members", {"user": user}))


@http_command("access:remove")
@app_option
@click.argument("user")
def access_remove(client: Client, app: str, user: str) -> None:
    """Stop a user managing the app (the owner or an admin; anyone may remove
    themselves): `tally access:remove -a blog bob`."""
    doing(f"Removing {user} from {app}",
          lambda: client.request("DELETE", f"/apps/{app}/members/{user}"))


@http_command("stats", json_output=True)
@app_option
@click.option("--minutes", default=60, show_default=True, help="The window, up to now.")
def stats(client: Client, app: str, minutes: int, as_json: bool) -> None:
    """The app's requests, memory, CPU and restarts per instance over the last minutes
    (sampled by the host agents every 10 s), and the router's: requests by status class,
    latency percentiles, held requests, retries (sampled by the balancers)."""
    emit(client.get(f"/apps/{app}/stats", minutes=minutes), as_json, _print_stats)


@http_command("ps", json_output=True)
@app_option
def ps(client: Client, app: str, as_json: bool) -> None:
    """The app's instances and their state."""
    emit(client.get(f"/apps/{app}/ps")["items"], as_json, lambda rows: table(
        rows, ["instance_id", "process_type", "release", "host_id", "port", "state",
               "restarts", "exit_code", "since", "reason"],
        f"no instances of {app} (scale it with `tally scale -a {app} web=1`)"))


SPARKS = "▁▂▃▄▅▆▇█"


def _print_stats(stats: dict[str, Any]) -> None:
    rows = [{**i, "memory": _mib(i["memory_bytes"]),
             "cpu": None if i["cpu_percent"] is None else f"{i['cpu_percent']}%"}
            for i in stats["instances"]]
    table(rows, ["instance_id", "host_id", "requests", "memory", "cpu", "restarts",
                 "last_sample_at"], f"no samples of {stats['app']} in the last "
          f"{stats['minutes']} minutes (instances report every 10 s)")
    if rows:
        per_minute = [m["requests"] for m in stats["series"]]
        top = max(per_minute) or 1
        spark = "".join(SPARKS[min(7, n * 8 // (top + 1))] for n in per_minute)
        click.echo(f"{stats['requests']} requests in {stats['minutes']} min "
                   f"({stats['requests_per_minute']}/min)  {spark}  "
                   f"memory {_mib(stats['memory_bytes'])}")
    router = stats.get("router") or {}
    if router.get("requests"):  # the balancers' view (Heroku's router metrics)
        classes = " ".join(f"{c}xx {router[f's{c}xx']}" for c in range(1, 6)
                           if router[f"s{c}xx"])
        click.echo(f"router: {router['requests']} requests ({classes}), p50 "
                   f"{router['p50_ms']} ms, p95 {router['p95_ms']} ms, p99 {router['p99_ms']} "
                   f"ms, held {router['held']}, retries {router['retries']}")


def _mib(n: int | None) -> str | None:
    return None if n is None else f"{n / 2**20:.0f} MiB"


COMMANDS = [apps, apps_create, apps_info, apps_delete, access_add, access_remove, stats, ps]
