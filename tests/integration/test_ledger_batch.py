"""Appends of many streams in one transaction (ledger/batch.py) and the placer's cheap read
of heartbeats (Ledger.last_per_stream): what the control plane leans on at fleet scale."""

from __future__ import annotations

import uuid

from agents.fleet import Fleet
from agents.placer import catch_up
from ledger import Ledger, NewEvent
from ledger.batch import Checked, Item, append_checked, append_streams


def _lost(h: str) -> NewEvent:
    return NewEvent("HostLost", {"host_id": h, "reason": "test"})


def _registered(h: str) -> NewEvent:
    return NewEvent("HostRegistered", {"host_id": h, "address": "127.0.0.1", "port_min": 7000,
                                       "port_max": 7009, "capacity": 4})


def test_checked_appends_land_together_or_not_at_all(ledger: Ledger) -> None:
    a, b = (f"bt-{uuid.uuid4().hex[:8]}" for _ in range(2))
    ledger.append(f"host-{a}", [_registered(a)])
    assert append_checked(ledger, [Checked(f"host-{a}", 1, [_lost(a)]),
                                   Checked(f"host-{b}", 0, [_registered(b), _lost(b)])])
    assert [e.version for e in ledger.read_stream(f"host-{b}")] == [1, 2]
    # host-a has moved past 1: nothing of this round lands, host-b's part neither
    assert not append_checked(ledger, [Checked(f"host-{b}", 2, [_registered(b)]),
                                       Checked(f"host-{a}", 1, [_lost(a)])])
    assert ledger.stream_version(f"host-{a}") == 2
    assert ledger.stream_version(f"host-{b}") == 2


def test_the_placers_fold_of_heartbeats_keeps_ledger_order(ledger: Ledger) -> None:
    """Heartbeats are read as each host's newest per page, no payload, merged by position:
    a heartbeat after a HostLost brings the host back, one before it does not."""
    back, gone = (f"hb-{uuid.uuid4().hex[:8]}" for _ in range(2))
    start = ledger.sequence()
    for h in (back, gone):
        ledger.append(f"host-{h}", [_registered(h)])
    beat = [NewEvent("HostHeartbeat", {"host_id": back, "load": 0.5})]
    ledger.append(f"heartbeat-{back}", beat)
    ledger.append(f"heartbeat-{gone}", [NewEvent("HostHeartbeat", {"host_id": gone})])
    ledger.append(f"heartbeat-{gone}", [NewEvent("HostHeartbeat", {"host_id": gone})])
    for h in (back, gone):
        ledger.append(f"host-{h}", [_lost(h)])
    ledger.append(f"heartbeat-{back}", beat)
    fleet = Fleet()
    fleet.position = start
    catch_up(ledger, fleet)
    head = ledger.head()
    assert fleet.position == head
    assert not fleet.hosts[back].lost and fleet.hosts[gone].lost
    last = ledger.last_of(f"heartbeat-{back}")
    assert last is not None and fleet.hosts[back].last_heartbeat == last.recorded_at
    newest = ledger.last_per_stream("heartbeat", start, head)
    assert [s for _, s, _ in newest] == [f"heartbeat-{gone}", f"heartbeat-{back}"]
    assert newest[0][0] < newest[1][0]



def test_a_batch_sent_again_with_its_key_writes_nothing(ledger: Ledger) -> None:
    """The API's heartbeat batches carry one key for the batch (its first event), none per
    event: sent again after a lost answer, the batch writes nothing; a new key writes."""
    hosts = [f"bk-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    items = [Item(f"heartbeat-{h}", NewEvent("HostHeartbeat", {"host_id": h})) for h in hosts]
    key = f"batch-{uuid.uuid4().hex}"
    assert append_streams(ledger, items, key) == 3
    assert append_streams(ledger, items, key) == 0
    assert append_streams(ledger, items[:1], f"batch-{uuid.uuid4().hex}") == 1
    assert [ledger.stream_version(f"heartbeat-{h}") for h in hosts] == [2, 1, 1]
