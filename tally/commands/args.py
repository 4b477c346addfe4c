"""The arguments user commands share: the app (`-a APP`, `APP`), the API URL, KEY=VALUE
pairs. Each is checked here, before anything is asked of the API."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import click


def check_app(name: str) -> str:
    """An app name as the platform writes them, refused here before anything is asked."""
    from ledger.catalogue import APP_NAME

    pattern: re.Pattern[str] = APP_NAME.regex  # type: ignore[assignment]  # a str pattern
    if not pattern.match(name):
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


def app_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A required `-a APP` (or TALLY_APP), checked as an app name."""
    return click.option("-a", "--app", "app", required=True, envvar="TALLY_APP",
                        help="The app (or TALLY_APP).",
                        callback=lambda ctx, param, value: check_app(value))(fn)


def api_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--api URL` for the commands that make their client themselves."""
    return click.option("--api", envvar="TALLY_API", help="API URL (default: from "
                        "`tally login`, or http://127.0.0.1:8000).")(fn)


def parse_pairs(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    """`KEY=VALUE` words as a dict; a word without `=` is a usage error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not {what}=VALUE")
        out[key] = value
    return out
