"""Replay: `state --at N` through PostgreSQL scratch tables equals the same projectors run
in memory over events 1..N; diff compares two such states; bad positions and views are
refused clearly."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest

import projectors
from bench.synthetic import fill, fleet_history
from ledger import Ledger
from ledger.cluster import Cluster
from projectors.replay import BadPosition, diff, diff_rows, state_at


def _in_memory(ledger: Ledger, upto: int) -> dict[str, list[dict[str, Any]]]:
    events, after = [], 0
    while after < upto:
        batch = ledger.read_all(after=after, upto=upto, limit=5000)
        events += batch
        after = batch[-1].position
    tables = projectors.project(projectors.ALL, events)
    return {v: tables[p.name].snapshot()[v] for v, p in projectors.VIEWS.items()}


@pytest.fixture(scope="module")
def history(cluster: Cluster) -> int:
    """A few thousand events of a fleet, under names of their own; returns the head."""
    with Ledger(cluster.dsn()) as ledger:
        fill(ledger, fleet_history(3000, hosts=4, apps=6, prefix=f"r{uuid.uuid4().hex[:6]}"))
        return ledger.sequence()


def test_state_at_n_equals_a_projection_of_events_1_to_n(cluster: Cluster, ledger: Ledger,
                                                         history: int) -> None:
    rnd = random.Random(history)
    dsn = cluster.dsn("tally_reader")
    for n in sorted({1, history, *rnd.sample(range(1, history), 3)}):
        replayed = state_at(dsn, n)
        expected = _in_memory(ledger, n)
        for view in projectors.VIEWS:
            assert replayed[view] == expected[view], f"view {view} differs at position {n}"


def test_one_view_at_a_time(cluster: Cluster, history: int) -> None:
    only = state_at(cluster.dsn("tally_reader"), history, "placements")
    assert list(only) == ["placements"] and only["placements"]


def test_diff_lists_what_changed_between_two_positions(cluster: Cluster, ledger: Ledger,
                                                       history: int) -> None:
    dsn = cluster.dsn("tally_reader")
    a, b = history // 2, history
    changes = diff(dsn, b, a, "instances")  # either order
    key = projectors.owner_of("instances").tables["instances"]
    assert changes["instances"] == diff_rows(_in_memory(ledger, a)["instances"],
                                             _in_memory(ledger, b)["instances"], key)
    assert any(changes["instances"].values())
    assert not any(diff(dsn, a, a, "apps")["apps"].values())


@pytest.mark.parametrize("position, view, message", [
    (10**12, None, "beyond the ledger head"),
    (-1, None, "must be >= 0"),
    (1, "nope", "unknown view 'nope'; views: apps, backups"),
])
def test_bad_input_is_refused_clearly(cluster: Cluster, history: int, position: int,
                                      view: str | None, message: str) -> None:
    with pytest.raises((BadPosition, projectors.UnknownProjector), match=message):
        state_at(cluster.dsn("tally_reader"), position, view)
