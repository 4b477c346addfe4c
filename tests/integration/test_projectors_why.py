"""`why` from real events in a real ledger: each situation of tests/unit/test_why.py,
appended under an app name of its own, loaded back by projectors.inspect.why."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from projectors.inspect import why
from tests.unit.test_why import SITUATIONS, History


@pytest.mark.parametrize("name", list(SITUATIONS))
def test_why_from_the_ledger(cluster: Cluster, ledger: Ledger, name: str) -> None:
    situation = SITUATIONS[name]
    history = History(f"w{uuid.uuid4().hex[:10]}")
    situation.build(history)
    for stream, event in history.appends:
        ledger.append(stream, [event])
    head = ledger.sequence()
    mine = ledger.read_stream(history.appends[-1][0])[-1]
    answer = why(cluster.dsn("tally_reader"), history.app, mine.recorded_at + situation.later)
    text = "\n".join(answer.lines())
    assert answer.serving is situation.serving, text
    for phrase in situation.says:
        assert phrase in text, f"{phrase!r} missing from:\n{text}"
    assert answer.head >= head


def test_why_reads_one_snapshot(cluster: Cluster, ledger: Ledger,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Events written while `why` reads (between its queries) are either all in its answer
    or none: its head is the head of what it read."""
    import projectors.inspect as inspect

    app = f"w{uuid.uuid4().hex[:10]}"
    ledger.append(f"app-{app}", [NewEvent("AppCreated", {"name": app, "owner": "ann"})])
    ledger.sequence()
    original, late = inspect._streams, []

    def streams_then_a_write(conn, names):  # type: ignore[no-untyped-def]
        found = original(conn, names)
        if not late:
            ledger.append(f"app-{app}", [NewEvent("ScaleChanged", {
                "app": app, "scale": {"web": 1}})])
            ledger.sequence()
            late.append(ledger.read_stream(f"app-{app}")[-1].position)
        return found
    monkeypatch.setattr(inspect, "_streams", streams_then_a_write)
    answer = why(cluster.dsn("tally_reader"), app, datetime.now(UTC))
    assert answer.head < late[0], "the answer claims a position whose event it never read"
