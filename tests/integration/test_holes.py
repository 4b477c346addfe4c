"""Pruned heartbeats leave holes in the positions: every reader steps over them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import psycopg2
import requests

from agents.fleet import Fleet
from agents.placer import catch_up as placer_catch_up
from api.auth import create_user
from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from ledger.retention import RetentionPolicy, prune
from projectors.inspect import read_events
from projectors.replay import replay
from tests.api_process import ApiProcess
from tests.conftest import free_ports, tally_env


def pruned_hole(cluster: Cluster, ledger: Ledger) -> tuple[str, int, int]:
    """Six heartbeats of one host in a row, then one of another; the first five pruned: a
    hole of five positions. Returns (host, position before them, head)."""
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
    return host, before, head


def test_every_reader_steps_over_a_pruned_hole(cluster: Cluster, ledger: Ledger) -> None:
    host, before, head = pruned_hole(cluster, ledger)

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


def test_the_apis_event_pages_step_over_a_pruned_hole(cluster: Cluster, ledger: Ledger) -> None:
    """GET /events, over HTTP from `tally serve api`, in pages of 2 events (smaller than the
    hole), continued from each answer's head: the same events as the ledger, both kept
    heartbeats, and a head past the hole; a stream filter finds the two kept ones."""
    host, before, head = pruned_hole(cluster, ledger)
    api = ApiProcess(tally_env(cluster), free_ports(1)[0])
    token = create_user(ledger, f"holes-{uuid.uuid4().hex[:6]}", "admin")
    try:
        api.wait_ready()

        def page(after: int, **params: object) -> dict:
            r = requests.get(f"{api.url}/events", params={"after": after, "limit": 2, **params},
                             headers={"Authorization": f"Bearer {token}"}, timeout=30)
            assert r.status_code == 200, r.text
            return r.json()
        seen, after = [], before
        while (answer := page(after))["events"]:
            seen += answer["events"]
            after = answer["head"]
        expected = [(e.position, e.stream, e.version)
                    for e in ledger.read_all(before, limit=None, upto=head)]
        assert [(e["position"], e["stream"], e["version"])
                for e in seen][:len(expected)] == expected
        assert after >= head
        streams = [f"heartbeat-{host}", f"heartbeat-{host}x"]
        found = page(before, stream=streams, limit=10)["events"]
        assert [(e["stream"], e["data"].get("instances")) for e in found] == [
            (streams[0], 5), (streams[1], 0)]
    finally:
        api.stop()
