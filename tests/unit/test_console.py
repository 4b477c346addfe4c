"""The CLI's shared parts (tally/console.py): one age parser, one table printer, one error
wrapper."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click
import pytest
from click.testing import CliRunner

from ledger.errors import VersionConflict
from tally.console import fail_cleanly, parse_age, parse_since, table

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("24h", 86400),
                                               ("7d", 604800), ("1.5h", 5400)])
def test_ages(text: str, seconds: float) -> None:
    assert parse_age(text).total_seconds() == seconds
    assert parse_since(text, NOW) == NOW - timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "10", "m", "-5m", "10x", "1e400d"])
def test_bad_ages_say_what_to_give(text: str) -> None:
    with pytest.raises(ValueError, match="must look like 90s"):
        parse_age(text)


def test_since_takes_iso_times_and_refuses_the_rest() -> None:
    assert parse_since("2026-11-26T19:00", NOW) == datetime(2026, 11, 26, 19, tzinfo=UTC)
    with pytest.raises(ValueError, match="ISO time"):
        parse_since("yesterday", NOW)
    with pytest.raises(ValueError, match="before the year 1"):
        parse_since("999999999d", NOW)


def test_one_table_printer() -> None:
    @click.command()
    def show() -> None:
        table([{"name": "blog", "scale": {"web": 2}, "domains": [], "at": NOW,
                "long": "x" * 80}])
        table([], ["name"], empty="no apps")

    out = CliRunner().invoke(show)
    lines = out.output.splitlines()
    assert lines[0].split() == ["NAME", "SCALE", "DOMAINS", "AT", "LONG"]
    assert lines[1].split()[:5] == ["blog", "web=2", "-", "2026-12-01", "12:00:00"]
    assert lines[1].endswith("x" * 57 + "...") and lines[2] == "no apps"


def test_one_error_wrapper_exits_1_with_one_line() -> None:
    @click.command()
    @fail_cleanly
    def conflict() -> None:
        raise VersionConflict("app-blog", 3, 4)

    out = CliRunner().invoke(conflict)
    assert out.exit_code == 1 and out.output.startswith("Error: ")
    assert "Traceback" not in out.output
