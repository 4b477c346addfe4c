"""agents/logpipe.py: an app's output reaches its log through a relay, in whole lines, and
no line of it can pass for the agent's."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from agents import logpipe
from agents.logs import Collector
from agents.processes import Processes


def test_no_app_line_starts_with_the_agents_mark_or_runs_past_the_longest() -> None:
    data = b"plain\n\x1eforged\n" + b"x" * (logpipe.LONGEST + 5)
    out = logpipe.app_lines(data)
    assert out[:2] == [b"plain\n", "\ufffdforged\n".encode()]
    assert [len(line) for line in out[2:]] == [logpipe.LONGEST + 1, 6]
    assert all(line.endswith(b"\n") and not line.startswith(logpipe.MARK) for line in out)


def test_no_app_line_holds_the_agents_mark_anywhere() -> None:
    """Review 4: a mark inside a line passed for the agent's where a reader starts mid-line
    (a tail's window, a shipper's 64 KiB read)."""
    out = logpipe.app_lines(b"x" * 100 + b"\x1etally: Error R14 forged\n")
    assert not any(logpipe.MARK in line for line in out)
    assert out == [b"x" * 100 + "\ufffdtally: Error R14 forged\n".encode(), b"\n"]


def test_lines_tell_the_agents_from_the_apps_and_break_nowhere_else() -> None:
    data = b"app\n\x1eR14\nx\ry\x1etally[z] forged\npartial"
    assert logpipe.lines(data) == [(False, "app"), (True, "R14"),
                                   (False, "x\ufffdy\ufffdtally[z] forged"),
                                   (False, "partial")]
    assert logpipe.lines(b"") == [] and logpipe.lines(b"a\n") == [(False, "a")]


def test_the_relay_writes_what_the_app_wrote_until_its_last_writer_closes(
        tmp_path: Path) -> None:
    """A real pipe and relay process: the app's partial last line is ended; the agent's
    line in between keeps its mark (the relay only ever writes whole lines)."""
    path = tmp_path / "web.1.log"
    write, relay = logpipe.start(path)
    os.write(write, b"one\ntw")
    os.write(write, b"o\n\x1eforged\nthree")
    os.close(write)
    relay.wait(30)
    logpipe.say(path, "Error R14 (Memory quota exceeded)")
    assert path.read_bytes() == ("one\ntwo\n\ufffdforged\nthree\n"
                                 "\x1eError R14 (Memory quota exceeded)\n").encode()
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_the_agents_lines_are_the_platforms_in_the_tail_and_the_collected_log(
        tmp_path: Path) -> None:
    procs = Processes(tmp_path / "agent")
    path = procs.log_path("blog.1.web.a")
    path.write_bytes(b"tally: Error R14 forged\n")
    procs.say("blog.1.web.a", "health check failed: killed")
    assert procs.tail("blog.1.web.a") == ["app: tally: Error R14 forged",
                                          "tally: health check failed: killed"]
    path.write_bytes(b"\x1b[1Gtally: moved back\n\x08\x08\x08\x08\x08tally: rubbed out\n")
    assert procs.tail("blog.1.web.a") == ["app: \ufffd[1Gtally: moved back",
                                          "app: \ufffd\ufffd\ufffd\ufffd\ufffdtally: rubbed out"]
    path.write_bytes(b"tally: Error R14 forged\n")
    procs.say("blog.1.web.a", "health check failed: killed")
    c = Collector(tmp_path / "applogs")
    now = datetime(2026, 12, 6, tzinfo=UTC)
    c.receive("blog", "blog.1.web.a", 0, 0, path.read_bytes(), now)
    stamp = "2026-12-06T00:00:00.000000Z"
    assert (tmp_path / "applogs" / "blog" / "current.log").read_text().splitlines() == [
        f"{stamp} blog.1.web.a tally: Error R14 forged",
        f"{stamp} tally[blog.1.web.a] health check failed: killed"]


def test_the_budget_drops_past_its_rate_and_its_cap_and_says_so_once() -> None:
    b = logpipe.Budget(rate=100, burst=200, cap=1000)
    line = b"x" * 99 + b"\n"
    assert b.admit(line, 0, now=0.0) and b.admit(line, 100, now=0.0)
    assert not b.admit(line, 200, now=0.0)  # the burst is spent
    assert not b.admit(line, 200, now=0.5)  # 50 bytes back: not a whole batch
    said = b.overflow()
    assert said.startswith(logpipe.MARK) and b"2 line(s)" in said
    assert b"faster than" in said and b.overflow() == b""
    assert b.admit(line, 200, now=1.5)  # a second later, room again
    assert not b.admit(line, 950, now=100.0)  # the file is at its cap, whatever the rate
    assert b"not yet collected" in b.overflow()


def test_an_app_printing_without_end_fills_no_disk(tmp_path: Path) -> None:
    """A real relay with a 64 KiB burst and cap: 4 MiB printed at once leave a log of
    at most the cap and one line of the agent's saying what was dropped, at the end (the
    app's writer closed) if not before."""
    path = tmp_path / "web.1.log"
    write, relay = logpipe.start(path, logpipe.Budget(rate=1024, burst=65536, cap=65536))
    block = (b"y" * 1023 + b"\n") * 1024
    for _ in range(4):
        os.write(write, block)
    os.close(write)
    relay.wait(30)
    data = path.read_bytes()
    assert len(data) <= 65536 + 200
    said = [text for ours, text in logpipe.lines(data) if ours]
    assert len(said) == 1 and said[0].startswith("Error L10 (output buffer overflow)"), said


def test_a_release_phases_output_shows_the_agents_lines_apart() -> None:
    """`tally deploy` prints a failed release phase's tail: the agent's lines as the
    platform's `----->` lines, the app's indented, its forged `tally: ...` too."""
    from tally.rollout import phase_line

    assert [phase_line(line) for line in ["app: migrating", "app: tally: killed",
                                          "tally: health check failed: killed"]] == [
        "       migrating", "       tally: killed", "-----> health check failed: killed"]
