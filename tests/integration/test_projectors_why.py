"""`why` from real events in a real ledger: each situation of tests/unit/test_why.py,
appended under an app name of its own, loaded back by projectors.inspect.why."""

from __future__ import annotations

import uuid

import pytest

from ledger import Ledger
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
