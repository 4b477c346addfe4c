"""Pruned heartbeats leave holes in the positions: every reader steps over them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import psycopg2

from agents.fleet import Fleet
from agents.placer import catch_up as placer_catch_up
from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from ledger.retention import RetentionPolicy, prune
from projectors.inspect import read_events
from projectors.replay import replay


def test_every_reader_steps_over_a_pruned_hole(cluster: Cluster, ledger: Ledger) -> None:
    host = "hole" + uuid.uuid4().hex[:6]
    before = ledger.sequence()
    for n in range(6):  # one append each: six positions in a row
        ledger.append(f"heartbeat-{host}", [NewEvent("HostHeartbeat",
                                                     {"host_id": host, "instances": n})])
    ledger.append(f"heartbeat-{host}x", [NewEvent("HostHeartbeat", {"host_id": host + "x"})])
    ledger.sequence()
    future = datetime.now(UTC) + timedelta(hours=1)
    assert prune(cluster.dsn("tally_owner"), RetentionPolicy("heartbeat", timedelta(0)),
                 now=future, stream=f"heartbeat-{host}") == 5
    head = ledger.sequence()
    kept = [(e.stream, e.data.get("instances")) for e in ledger.read_all(before)
            if e.stream.startswith(f"heartbeat-{host}")]
    assert kept == [(f"heartbeat-{host}", 5), (f"heartbeat-{host}x", 0)]

    # Ledger.read_all in pages smaller than the hole.
    paged, after = [], before
    while page := ledger.read_all(after, limit=2):
        paged += page
        after = page[-1].position
    assert after == head and [e.stream for e in paged][-2:] == [f"heartbeat-{host}",
                                                               f"heartbeat-{host}x"]
    # `tally events` (projectors.inspect) in pages.
    conn = psycopg2.connect(cluster.dsn("tally_reader"))
    try:
        seen, after = [], before
        while page := read_events(conn, after=after, limit=2):
            seen += page
            after = page[-1].position
        assert [e.position for e in seen] == [e.position for e in paged]
    finally:
        conn.close()
    # The projector runtime reads ranges of positions smaller than the hole.
    replay(cluster.dsn("tally_reader"), [head], "hosts", batch=2)
    # The placer's fold.
    fleet = Fleet()
    fleet.position = before
    placer_catch_up(ledger, fleet, ["heartbeat"], sequence=False)
    assert fleet.position == head
