"""`tally` commands for developers: apps, deploy, releases, scale, config, domains, ps,
maintenance; `tally login` and `tally admin create-user`; `tally serve api`.

They talk HTTP to the API (tally/client.py): quiet on success, `--json` on every read, one
line and exit status 1 on any failure.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Any

import click

from api.services import Settings
from ledger.cluster import Cluster
from tally import packing
from tally.buildlog import follow_build
from tally.client import Client, ClientError, save_credentials
from tally.config import Config, api_client, credentials_path, run_key_from_env
from tally.console import cell, fail_cleanly, table

# --- plumbing -------------------------------------------------------------------------------


def http_command(group: click.Group, name: str, json_output: bool = False) -> Callable:
    """A command talking to the API: `--api URL`, optional `--json`, errors as one line."""
    def decorate(fn: Callable[..., Any]) -> click.Command:
        @wraps(fn)
        @fail_cleanly
        def run(*args: Any, api: str | None, **kwargs: Any) -> Any:
            client = None
            try:
                client = api_client(api)
                return fn(client, *args, **kwargs)
            except (KeyError, TypeError, AttributeError) as exc:  # an answer of another shape
                where = client.api if client else "the API"
                raise click.ClickException(f"unexpected answer from {where} ({exc!r} missing):"
                                           f" is it the tally API, and of this version?") from exc
        run = click.option("--api", envvar="TALLY_API", help="API URL (default: from "
                           "`tally login`, or http://127.0.0.1:8000).")(run)
        if json_output:
            run = click.option("--json", "as_json", is_flag=True,
                               help="Machine-readable output.")(run)
        return group.command(name)(run)
    return decorate


def check_app(name: str) -> str:
    """An app name as the platform writes them, refused here before anything is asked."""
    from ledger.catalogue import APP_NAME

    if not APP_NAME.regex.match(name):
        raise click.ClickException(f"{name[:40]!r} is not an app name: it {APP_NAME.error}")
    return name


def app_and_arg(app: str | None, arg: str | None) -> str:
    """The app of a command that takes it as `-a APP` or, as it always has, `APP`."""
    if app and arg and app != arg:
        raise click.UsageError(f"two apps given: -a {app} and {arg}")
    name = arg or app
    if not name:
        raise click.UsageError("which app? give -a APP (or TALLY_APP)")
    return check_app(name)


def app_arg(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`-a APP` or a positional `[APP]`, for the commands that took a name before -a."""
    fn = click.argument("app_arg", metavar="[APP]", required=False)(fn)
    return click.option("-a", "--app", "app", envvar="TALLY_APP",
                        help="The app (or TALLY_APP, or the APP argument).")(fn)


def doing(what: str, fn: Callable[[], Any], done: Callable[[Any], str] = lambda _: "done"
          ) -> Any:
    """Heroku's confirmation line on stderr: `Setting K and restarting blog... done, v8`."""
    click.echo(f"{what}... ", err=True, nl=False)
    try:
        result = fn()
    except ClientError:
        click.echo("failed", err=True)
        raise
    click.echo(done(result), err=True)
    return result


def app_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-a", "--app", "app", required=True, envvar="TALLY_APP",
                        help="The app (or TALLY_APP).",
                        callback=lambda ctx, param, value: check_app(value))(fn)


def emit(data: Any, as_json: bool, text: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=1, sort_keys=True))
    else:
        text(data)


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


def _mib(n: int | None) -> str | None:
    return None if n is None else f"{n / 2**20:.0f} MiB"


def parse_pairs(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not {what}=VALUE")
        out[key] = value
    return out


# --- registration ---------------------------------------------------------------------------


def register(cli: click.Group) -> None:
    """Add this module's commands to the `tally` group."""
    _serve(cli)
    _admin(cli)
    _session(cli)
    _apps(cli)
    _releases(cli)
    _settings(cli)


def addon_database(cluster: Cluster, app: str) -> str:
    """The app's add-on database in the apps cluster (made and started on first use): an
    existing one is the API's 409, a cluster that cannot be made or reached its 503."""
    import psycopg2

    from agents import addons
    from api.errors import Conflict, Unavailable
    from ledger import ClusterError

    try:
        addons.ensure_cluster(cluster)
        return addons.create_database(cluster, app)
    except addons.AddonError as exc:
        raise Conflict(str(exc)) from exc
    except (ClusterError, psycopg2.Error, OSError) as exc:
        raise Unavailable(f"the apps' database cluster is not available: {exc}") from exc


def api_settings(cfg: Config) -> Settings:
    """The API wired to this platform: the ledger, the bundle store, the app log files."""
    from agents import logs

    def tail(app: str, lines: int) -> list[str]:
        return logs.tail(cfg.app_logs_dir, app, lines)

    def follow(app: str, stop: threading.Event) -> Iterator[str]:
        return logs.follow(cfg.app_logs_dir, app, stop, idle=True)

    def create_database(app: str) -> str:
        return addon_database(cfg.apps_cluster(), app)

    return Settings(dsn=cfg.cluster().dsn("tally_writer"), bundles_dir=cfg.bundles_dir,
                    max_bundle_bytes=cfg.max_bundle_bytes, app_uids=cfg.app_uids,
                    logs_tail=tail, logs_follow=follow,
                    web_port=cfg.web_port, run_key=run_key_from_env(),
                    create_database=create_database, build_logs_dir=cfg.build_logs_dir)


def _serve(cli: click.Group) -> None:
    serve = cli.commands["serve"]
    assert isinstance(serve, click.Group)

    @serve.command("api")
    @click.option("--bind", envvar="TALLY_API_BIND", default="127.0.0.1:8000",
                  show_default=True)
    @click.option("--workers", default=2, show_default=True)
    @click.option("--threads", default=4, show_default=True)
    def serve_api(bind: str, workers: int, threads: int) -> None:
        """The JSON API under gunicorn."""
        import dataclasses

        from api import create_app
        from api.serve import Gunicorn, options

        try:
            settings = api_settings(Config.from_env())
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"cannot configure the API: {exc}") from exc
        # long-polls may hold half the threads at most: the rest keep answering
        settings = dataclasses.replace(settings, long_poll_slots=max(1, threads // 2))
        settings.bundles_dir.mkdir(parents=True, exist_ok=True)
        settings.bundles_dir.chmod(0o700)  # every app's code: not for apps on this machine
        Gunicorn(create_app(settings), options(bind, workers, threads)).run()


def first_admin(cfg: Config) -> list[str]:
    """Called by `tally up`: if no admin exists yet, create one, log this machine's CLI in
    with it, and return the lines that show its token once."""
    from api.auth import create_user, has_admin
    from ledger import Ledger

    with Ledger(cfg.cluster().dsn("tally_writer"), retry_deadline=10) as ledger:
        if has_admin(ledger):
            return []
        token = create_user(ledger, "admin", "admin", actor="tally up")
    path = save_credentials(credentials_path(), f"http://{cfg.api_bind}", token, "admin")
    return [f"  first admin: user `admin`, token {token}",
            f"  (shown once; saved in {path}; more users: tally admin create-user)"]


def _admin(cli: click.Group) -> None:
    @cli.group()
    def admin() -> None:
        """Operator commands, run on a ledger host (they write to the ledger directly)."""

    @admin.command("create-user")
    @click.argument("name")
    @click.option("--role", type=click.Choice(["admin", "member", "agent"]),
                  default="member", show_default=True)
    @click.option("--host", "host_id", help="The host an agent token acts for.")
    @click.pass_obj
    def create_user(cfg: Any, name: str, role: str, host_id: str | None) -> None:
        """Create a user and print their API token (shown once)."""
        from api.auth import create_user as create
        from ledger import Ledger, LedgerError

        if (role == "agent") != bool(host_id):
            raise click.ClickException("--host is required for agents, and only for them")
        try:
            with Ledger(cfg.cluster().dsn("tally_writer"), retry_deadline=5) as ledger:
                token = create(ledger, name, role, host_id)
        except LedgerError as exc:
            msg = f"a user named {name!r} exists" if "expected no stream" in str(exc) else exc
            raise click.ClickException(str(msg)) from exc
        click.echo(token)


    @http_command(admin, "quota", json_output=True)
    @click.argument("subject", type=click.Choice(["user", "app"]))
    @click.argument("name")
    @click.option("--instances", type=int, help="Instances at once.")
    @click.option("--memory-mb", type=int, help="Memory of all instances together, MiB.")
    @click.option("--bundle-mb", type=int, help="A bundle upload, MiB.")
    @click.option("--slug-mb", type=int, help="A built slug, MiB.")
    @click.option("--unpacked-mb", type=int, help="What a bundle or slug unpacks to, MiB.")
    @click.option("--default", "defaults", multiple=True,
                  type=click.Choice(["instances", "memory_mb", "bundle_mb", "slug_mb",
                                     "unpacked_mb"]), help="Put a limit back to the default.")
    def quota(client: Client, subject: str, name: str, defaults: tuple[str, ...],
              as_json: bool, **limits: int | None) -> None:
        """Show a user's or an app's quota and usage; with options, set it (admins)."""
        path = f"/quotas/{subject}s/{name}"
        changes: dict[str, int | None] = {k: v for k, v in limits.items() if v is not None}
        changes.update(dict.fromkeys(defaults))
        shown = client.request("PUT", path, json=changes) if changes else client.get(path)
        emit(shown, as_json, lambda q: [click.echo(
            f"{k:12} {q['used'].get(k, '-')!s:>8} of {v}") for k, v in q["limits"].items()])

    @admin.command("suffix")
    @click.argument("suffix", required=False)
    @click.pass_obj
    def suffix(cfg: Any, suffix: str | None) -> None:
        """Print the platform suffix apps answer under (<app>.SUFFIX), or set it."""
        from ledger import LedgerError
        from tally.platform import platform_suffix

        try:
            click.echo(platform_suffix(cfg, suffix.lower().rstrip(".") if suffix else None))
        except LedgerError as exc:
            raise click.ClickException(str(exc)) from exc


def _session(cli: click.Group) -> None:
    @cli.command("login")
    @click.option("--api", envvar="TALLY_API", default=None, help="API URL.")
    @click.option("--token", envvar="TALLY_TOKEN", help="API token (prompted if not given).")
    def login(api: str | None, token: str | None) -> None:
        """Check an API token and save it for the next commands."""
        token = token or click.prompt("API token", hide_input=True)
        client = api_client(api, token)
        try:
            me = client.get("/me")
            name, role = me["name"], me["role"]
        except ClientError as exc:
            raise click.ClickException(str(exc)) from exc
        except (KeyError, TypeError) as exc:
            raise click.ClickException(f"{client.api} answered /me with something else: "
                                       "is it the tally API?") from exc
        path = save_credentials(credentials_path(), client.api, token, name)
        click.echo(f"logged in to {client.api} as {name} ({role}); "
                   f"token saved in {path}", err=True)

    @http_command(cli, "whoami", json_output=True)
    def whoami(client: Client, as_json: bool) -> None:
        """Who the saved token belongs to."""
        emit(client.get("/me"), as_json, lambda me: click.echo(f"{me['name']} ({me['role']})"))


def _apps(cli: click.Group) -> None:
    @http_command(cli, "apps", json_output=True)
    def apps(client: Client, as_json: bool) -> None:
        """The apps you may manage."""
        emit(client.get("/apps")["apps"], as_json, lambda rows: table(
            rows, ["name", "owner", "release", "scale", "domains", "maintenance"],
            "no apps yet: create one with `tally apps:create NAME`"))

    @http_command(cli, "apps:create")
    @app_arg
    def apps_create(client: Client, app: str | None, app_arg: str | None) -> None:
        """Create an app (3-30 lowercase letters, digits, dashes): `tally apps:create blog`."""
        name = app_and_arg(app, app_arg)
        doing(f"Creating {name}", lambda: client.post("/apps", {"name": name}),
              lambda a: f"done, {a['web_url']}" if a.get("web_url") else "done")

    @http_command(cli, "apps:info", json_output=True)
    @app_arg
    def apps_info(client: Client, app: str | None, app_arg: str | None, as_json: bool) -> None:
        """One app: release, scale, domains, members: `tally apps:info -a blog`."""
        name = app_and_arg(app, app_arg)

        def text(a: dict[str, Any]) -> None:
            for key in ("name", "web_url", "owner", "members", "release", "scale", "domains",
                        "maintenance", "created_at"):
                click.echo(f"{key + ':':13} {cell(a.get(key))}")
        emit(client.get(f"/apps/{name}"), as_json, text)

    @http_command(cli, "apps:delete")
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

    @http_command(cli, "access:add")
    @app_option
    @click.argument("user")
    def access_add(client: Client, app: str, user: str) -> None:
        """Let another user manage the app: `tally access:add -a blog bob`."""
        doing(f"Adding {user} to {app}",
              lambda: client.post(f"/apps/{app}/members", {"user": user}))

    @http_command(cli, "access:remove")
    @app_option
    @click.argument("user")
    def access_remove(client: Client, app: str, user: str) -> None:
        """Stop a user managing the app (the owner or an admin; anyone may remove
        themselves): `tally access:remove -a blog bob`."""
        doing(f"Removing {user} from {app}",
              lambda: client.request("DELETE", f"/apps/{app}/members/{user}"))

    @http_command(cli, "stats", json_output=True)
    @app_option
    @click.option("--minutes", default=60, show_default=True, help="The window, up to now.")
    def stats(client: Client, app: str, minutes: int, as_json: bool) -> None:
        """The app's requests, memory, CPU and restarts per instance over the last minutes
        (sampled by the host agents every 10 s)."""
        emit(client.get(f"/apps/{app}/stats", minutes=minutes), as_json, _print_stats)

    @http_command(cli, "ps", json_output=True)
    @app_option
    def ps(client: Client, app: str, as_json: bool) -> None:
        """The app's instances and their state."""
        emit(client.get(f"/apps/{app}/ps")["items"], as_json, lambda rows: table(
            rows, ["instance_id", "process_type", "release", "host_id", "port", "state",
                   "restarts", "exit_code", "since", "reason"],
            f"no instances of {app} (scale it with `tally scale -a {app} web=1`)"))


def _releases(cli: click.Group) -> None:
    @http_command(cli, "deploy")
    @app_option
    @click.argument("folder", default=".", type=click.Path(exists=True, file_okay=False,
                                                            path_type=Path))
    @click.option("-m", "--message", "description", default="", help="Release description.")
    @click.option("--wait/--no-wait", default=True, show_default=True,
                  help="Follow the rollout until the instances are healthy.")
    @click.option("--timeout", default=120.0, show_default=True, help="Seconds to follow.")
    def deploy(client: Client, app: str, folder: Path, description: str, wait: bool,
               timeout: float) -> None:
        """Pack FOLDER (git's files in a work tree; never .env or local databases; minus
        .slugignore), upload it as a new release, show its build, and follow the rollout."""
        data, count = packing.pack(folder.resolve())
        digest = hashlib.sha256(data).hexdigest()
        with click.progressbar(length=len(data), file=sys.stderr,
                               label=f"uploading {count} files, {packing.size(len(data))}"
                                     ) as bar:
            release = client.upload(f"/apps/{app}/releases", data,
                                    {"digest": digest, "description": description},
                                    bar.update)
        number = release["number"]
        click.echo(f"release v{number} created", err=True)
        if wait:
            follow_build(client, app, number, max(timeout, 900.0), timeout)
            follow(client, app, number, timeout)
        url = client.get(f"/apps/{app}").get("web_url")
        if url:
            click.echo(f"{app} answers at {url}")

    @http_command(cli, "releases", json_output=True)
    @app_option
    def releases(client: Client, app: str, as_json: bool) -> None:
        """The app's releases, newest first, with their rollout status and why a failed
        one failed."""
        def text(rows: list[dict[str, Any]]) -> None:
            for r in rows:
                r["version"] = f"v{r['number']}"
                r["digest"] = r["bundle_digest"][:12]
                r["failure"] = r.get("failure_reason")
            table(rows, ["version", "status", "description", "digest", "created_by",
                         "created_at", "failure"],
                  f"{app} has no releases yet: `tally deploy -a {app}`")
        emit(client.get(f"/apps/{app}/releases")["releases"], as_json, text)

    @http_command(cli, "rollback")
    @app_option
    @click.argument("release", required=False)
    def rollback(client: Client, app: str, release: str | None) -> None:
        """A new release with an earlier one's code and config (default: the previous)."""
        number = None
        if release is not None:
            try:
                number = int(release.lstrip("v"))
            except ValueError:
                raise ClientError(f"{release!r} is not a release like v3") from None
        doing(f"Rolling back {app}" + (f" to v{number}" if number else ""),
              lambda: client.post(f"/apps/{app}/rollback", {"release": number}),
              lambda new: f"done, rolled back to v{new['rollback_of']} as v{new['number']}")


ROLLOUT = ("ReleaseDeployed", "ReleaseFailed", "PlacementFailed")


def follow(client: Client, app: str, number: int, timeout: float) -> None:
    """Follow release `number` until the placer says it is deployed (every wanted instance
    healthy) or failed (with its reason), printing instance progress; or time out saying
    what it still waits for."""
    scale = client.get(f"/apps/{app}")["scale"]
    wanted = sum(scale.values())
    if wanted == 0:
        click.echo(f"v{number} released; no process is scaled up (`tally scale web=1`)",
                   err=True)
        return
    click.echo(f"waiting for {wanted} instance(s) of v{number} to be healthy "
               f"({cell(scale)}): placed by the placer, started by host agents", err=True)
    deadline = time.monotonic() + timeout
    cursor, seen, said = 0, "", set()
    while True:
        asked = time.monotonic()
        page = client.get(f"/apps/{app}/events", after=cursor, type=list(ROLLOUT),
                          wait=min(2.0, max(0.0, deadline - asked)))
        if not page["events"] and time.monotonic() - asked < 0.5:
            time.sleep(0.5)  # the API answered without waiting (busy): do not spin
        cursor = page["head"]
        for e in page["events"]:
            if e["data"].get("release") != number:
                continue
            if e["type"] == "ReleaseDeployed":
                click.echo(f"v{number} is deployed: every wanted instance is healthy", err=True)
                return
            if e["type"] == "ReleaseFailed":
                serving = [r["number"] for r in client.get(f"/apps/{app}/releases")["releases"]
                           if r.get("status") == "deployed"]
                still = (f" (v{serving[0]} keeps serving)" if serving else
                         " (nothing of the app was serving before: nothing serves now)")
                raise ClientError(f"v{number} failed to deploy: {e['data']['reason']}{still}")
            if e["data"]["reason"] not in said:
                said.add(e["data"]["reason"])
                click.echo(f"  the placer cannot place every instance yet: "
                           f"{e['data']['reason']}", err=True)
        rows = [r for r in client.get(f"/apps/{app}/ps")["items"] if r["release"] == number]
        progress = ", ".join(f"{r['process_type']} {r['state']}" for r in rows)
        if progress and progress != seen:
            seen = progress
            click.echo(f"  instances: {progress}", err=True)
        if time.monotonic() >= deadline:
            healthy = sum(1 for r in rows if r["state"] == "healthy")
            states = cell(sorted({r["state"] for r in rows})) if rows else "none placed"
            raise ClientError(
                f"v{number} is released but not running after {timeout:.0f}s: {healthy} of "
                f"{wanted} healthy, instances: {states} (are the placer and a host agent "
                f"running? `tally why {app}`)")


def _settings(cli: click.Group) -> None:
    @http_command(cli, "scale")
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

    @http_command(cli, "config", json_output=True)
    @app_option
    def config(client: Client, app: str, as_json: bool) -> None:
        """The app's config vars with their values."""
        def text(c: dict[str, str]) -> None:
            for k in sorted(c):
                click.echo(f"{k}={c[k]}")
        emit(client.get(f"/apps/{app}/config")["config"], as_json, text)

    @http_command(cli, "config:set")
    @app_option
    @click.argument("pairs", nargs=-1, required=True)
    def config_set(client: Client, app: str, pairs: tuple[str, ...]) -> None:
        """Set config vars (a new release): `tally config:set -a blog KEY=value ...`."""
        values = parse_pairs(pairs, "KEY")
        _config_change(client, app, f"Setting {', '.join(values)}", {"set": values})

    @http_command(cli, "config:unset")
    @app_option
    @click.argument("keys", nargs=-1, required=True)
    def config_unset(client: Client, app: str, keys: tuple[str, ...]) -> None:
        """Unset config vars (a new release): `tally config:unset -a blog KEY ...`."""
        _config_change(client, app, f"Unsetting {', '.join(keys)}", {"unset": list(keys)})

    @http_command(cli, "domains", json_output=True)
    @app_option
    def domains(client: Client, app: str, as_json: bool) -> None:
        """The app's hostnames."""
        emit(client.get(f"/apps/{app}/domains")["domains"], as_json,
             lambda ds: [click.echo(d) for d in ds])

    @http_command(cli, "domains:add")
    @app_option
    @click.argument("domain")
    def domains_add(client: Client, app: str, domain: str) -> None:
        """Route a hostname (or `*.suffix`) to the app:
        `tally domains:add -a blog www.example.com`."""
        doing(f"Adding {domain} to {app}",
              lambda: client.post(f"/apps/{app}/domains", {"domain": domain}))

    @http_command(cli, "domains:remove")
    @app_option
    @click.argument("domain")
    def domains_remove(client: Client, app: str, domain: str) -> None:
        """Stop routing a hostname to the app:
        `tally domains:remove -a blog www.example.com`."""
        doing(f"Removing {domain} from {app}",
              lambda: client.request("DELETE", f"/apps/{app}/domains/{domain}"))

    for state, enabled in (("on", True), ("off", False)):
        _maintenance(cli, state, enabled)


def _config_change(client: Client, app: str, what: str, change: dict[str, Any]) -> None:
    """A config change, confirmed with the release it made (none before the first deploy)."""
    def done(c: dict[str, Any]) -> str:
        return f"done, v{c['release']}" if c.get("release") else "done"
    restarting = client.get(f"/apps/{app}").get("release") is not None
    doing(f"{what} and restarting {app}" if restarting else f"{what} for {app}",
          lambda: client.request("PATCH", f"/apps/{app}/config", json=change), done)


def _maintenance(cli: click.Group, state: str, enabled: bool) -> None:
    @http_command(cli, f"maintenance:{state}")
    @app_option
    def maintenance(client: Client, app: str) -> None:
        """Switch maintenance mode (the balancers answer 503 with a page):
        `tally maintenance:on -a blog`."""
        doing(f"{'Enabling' if enabled else 'Disabling'} maintenance mode for {app}",
              lambda: client.request("PUT", f"/apps/{app}/maintenance",
                                     json={"enabled": enabled}))
