"""The watchdog's choice of sessions to end, without a database."""

from __future__ import annotations

from agents.watchdog import Session, blanked, overdue


def session(role: str = "tally_writer", held: float = 0.0, sync: bool = False) -> Session:
    return Session(1, role, "tally", "app", held, "SELECT 1", sync)


def test_only_sessions_past_the_limit_are_ended() -> None:
    young, old = session(held=1.9), session(held=2.1)
    assert overdue([young, old], limit=2.0) == [old]


def test_a_commit_waiting_for_the_standby_is_left_alone() -> None:
    assert overdue([session(held=60, sync=True)], limit=2.0) == []


def test_literals_are_blanked_and_queries_cut() -> None:
    assert blanked("ALTER ROLE x PASSWORD 'se''cret'") == "ALTER ROLE x PASSWORD '?'"
    assert len(blanked("x" * 10_000)) == 500
