"""What every `tally` command shares: one error wrapper, one table printer, the stop signal
and the daemons' log format. The command modules import this; nothing here imports them,
so the CLI's modules form no cycle."""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import Any

import click

from ledger.errors import LedgerError


def _domain_errors() -> tuple[type[Exception], ...]:
    """Errors a command shows as one line: bad input (ValueError and its kin), the ledger
    or a file unreachable, an answer the API refused. Imported late: the CLI starts fast."""
    from projectors.rebuild import RebuildFailed
    from projectors.replay import ReplayFailed
    from tally.client import ClientError

    return (LedgerError, ValueError, OSError, RebuildFailed, ReplayFailed, ClientError)


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a domain error into `Error: <message>` and exit status 1, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import psycopg2

        try:
            return fn(*args, **kwargs)
        except psycopg2.OperationalError as exc:
            raise click.ClickException(f"cannot reach the ledger database: {_first(exc)}") \
                from exc
        except psycopg2.Error as exc:  # e.g. views not migrated yet
            raise click.ClickException(f"database error: {_first(exc)}") from exc
        except BrokenPipeError:
            raise  # a reader that left (`| head`): click exits quietly, not an error
        except _domain_errors() as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _first(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def table(rows: list[dict[str, Any]], columns: list[str] | None = None,
          empty: str = "(no rows)", width: int = 60) -> None:
    """Rows as aligned columns under upper-case headings (all of the first row's columns
    unless named), long values cut to `width`; `empty` on stderr when there is none."""
    if not rows:
        click.echo(empty, err=True)
        return
    columns = columns or list(rows[0])
    cells = [[cell(r.get(c), width) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))
               .rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def cell(value: Any, width: int = 60) -> str:
    """One value as text: "-" for none, k=v pairs, a comma list, cut to `width`."""
    if value is None:
        text = "-"
    elif isinstance(value, datetime):
        text = value.strftime("%Y-%m-%d %H:%M:%S")
    elif isinstance(value, dict):
        text = " ".join(f"{k}={cell(v, width)}" for k, v in sorted(value.items())) or "-"
    elif isinstance(value, list):
        text = ",".join(v if isinstance(v, str) else json.dumps(v, default=str)
                        for v in value) or "-"
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def stop_event(stop: threading.Event | None = None) -> threading.Event:
    """`stop` (or a new event), set by SIGTERM or SIGINT: a daemon's signal to finish its
    round and exit."""
    stop = stop or threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def daemon_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def host_token(token_file: Path | None, from_env: str, missing: str) -> str:
    """A fleet daemon's token, from --token-file or else its environment variable's value
    `from_env`; a usage error saying `missing` without one (it has no other way to speak to
    the platform)."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise click.BadParameter(f"cannot read it: {exc.strerror}",
                                     param_hint="--token-file") from None
    else:
        token = from_env.strip()
    if not token:
        raise click.UsageError(missing)
    return token


def parse_age(text: str) -> timedelta:
    """`90s`, `15m`, `24h`, `7d` (or `1.5h`) -> timedelta; ValueError saying so otherwise."""
    text = text.strip()
    try:
        value, unit = float(text[:-1]), text[-1]
        if unit not in AGE_UNITS or value < 0:
            raise ValueError
        return timedelta(seconds=value * AGE_UNITS[unit])
    except (ValueError, IndexError, OverflowError):
        raise ValueError(f"age {text!r} must look like 90s, 15m, 24h or 7d") from None


def parse_since(text: str, now: datetime) -> datetime:
    """An age ago (`10m`, `2h`: see parse_age) or an ISO 8601 time (UTC if no zone)."""
    try:
        age = parse_age(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise ValueError(f"--since {text!r}: give an ISO time (2026-11-26T19:00) or an "
                             "age like 30s, 10m, 2h, 1d") from None
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    try:
        return now - age
    except OverflowError:
        raise ValueError(f"--since {text!r}: that is before the year 1") from None
