"""The agents' commands refuse bad input with one line and a non-zero exit, before they
touch a database or a socket."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tally.cli import cli


@pytest.mark.parametrize(("args", "message"), [
    (["serve", "agent", "--host-id", "h1", "--port-range", "7099-7000"], "1 <= A <= B"),
    (["serve", "agent", "--host-id", "h1", "--port-range", "lots"], "7000-7099"),
    (["serve", "placer", "--ttl", "3", "--suspect-after", "5"], "below --ttl"),
    (["logs", "../etc"], "not an app name"),
    (["addons:create", "blog", "memcached"],
     "'memcached' is not an add-on tally has (postgresql, redis)"),
    (["run", "blog"], "give the app and the command: tally run -a APP -- CMD"),
    (["run", "--", "ls"], "give the app and the command"),
    (["run", "-a", "blog"], "Missing argument 'COMMAND"),
    (["logs"], "which app? give -a APP"),
    (["serve", "agent", "--host-id", "h1"], "an agent needs its host's agent token"),
    (["serve", "agent", "--host-id", "h1", "--token-file", "/nonexistent/t"], "cannot read it"),
    (["admin", "create-user", "x", "--role", "agent"], "needs a host, and only they"),
    (["admin", "create-user", "x", "--host", "h1"], "needs a host, and only they"),
    (["ledger", "prune", "--category", "app"], "app is history tally keeps"),
    (["serve", "builder"], "a builder needs its builder token"),
    (["serve", "builder", "--token-file", "/nonexistent/t"], "cannot read it"),
    (["serve", "builder", "--api", "ftp://x", "--token-file", __file__], "must look like"),
])
def test_bad_input_is_one_clear_line(args: list[str], message: str, tmp_path) -> None:
    result = CliRunner().invoke(cli, args, env={"TALLY_HOME": str(tmp_path)})
    assert result.exit_code in (1, 2), result.output
    assert message in result.output
    assert "Traceback" not in result.output
