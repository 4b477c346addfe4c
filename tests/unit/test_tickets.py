"""Run tickets without sockets: per-host keys, and a run that starts once however often
and whenever it is attached (ledger/tickets.py, api/runs.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from api import runs
from api.errors import Conflict
from api.state import Run
from ledger.tickets import TTL_S, Redeemed, TicketRefused, host_key, new_key, sign, verify

T0 = datetime(2026, 12, 6, 9, 0, tzinfo=UTC).timestamp()


def a_run(started: float = T0) -> Run:
    return Run(3, "r" * 24, ("python", "manage.py", "shell"), "h1", 2, False, "ann",
               datetime.fromtimestamp(started, UTC).isoformat())


def test_a_ticket_signed_with_one_hosts_key_is_refused_by_another() -> None:
    master = new_key()
    h1, h2 = host_key(master, "h1"), host_key(master, "h2")
    assert len({master, h1, h2}) == 3 and host_key(master, "h1") == h1
    for_h2 = replace(runs.ticket("blog", a_run(), "ann", "run", T0), host="h2")
    assert verify(h2, sign(h2, for_h2), "h2", T0).host == "h2"
    for forger in (h1, master):  # a taken-over h1, or an agent given the platform's key
        with pytest.raises(TicketRefused, match="signature"):
            verify(h2, sign(forger, for_h2), "h2", T0)


def test_a_run_attached_again_after_30_s_does_not_start_again() -> None:
    """The run's tickets are all issued at its start, with its id as nonce: the agent
    remembers that nonce as long as any of them is good."""
    key, run = host_key(new_key(), "h1"), a_run()
    used = Redeemed(since=T0 - 100)
    first = verify(key, sign(key, runs.ticket("blog", run, "ann", "run", T0 + 1)), "h1", T0 + 1)
    used.redeem(first, T0 + 1)
    again = verify(key, sign(key, runs.ticket("blog", run, "ann", "run", T0 + 20)), "h1", T0 + 20)
    with pytest.raises(TicketRefused, match="already used"):
        used.redeem(again, T0 + 20)
    late = sign(key, runs.ticket("blog", run, "ann", "run", T0 + TTL_S + 1))
    with pytest.raises(TicketRefused, match="expired"):  # the nonce is forgotten by now
        verify(key, late, "h1", T0 + TTL_S + 1)
    runs.attachable(run, "ann", T0 + TTL_S - 1)
    with pytest.raises(Conflict, match="can no longer be attached"):
        runs.attachable(run, "ann", T0 + TTL_S + 1)


def test_a_run_started_before_its_agent_restarted_is_not_started_by_it() -> None:
    key, run = host_key(new_key(), "h1"), a_run()
    restarted = Redeemed(since=T0 + 5)  # forgot what it redeemed before
    ticket = verify(key, sign(key, runs.ticket("blog", run, "ann", "run", T0 + 6)), "h1", T0 + 6)
    with pytest.raises(TicketRefused, match="before this agent started"):
        restarted.redeem(ticket, T0 + 6)


def test_a_stop_ticket_is_fresh() -> None:
    stop = runs.ticket("blog", a_run(), "root", "stop", T0 + 100)
    assert stop.issued == T0 + 100 and stop.expires == T0 + 100 + TTL_S
    assert stop.nonce != a_run().run_id
