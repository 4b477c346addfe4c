"""The ledger against a real PostgreSQL primary with a synchronous standby."""

from __future__ import annotations

import multiprocessing as mp
import random
import time
import uuid

import pytest

from ledger import (
    ANY,
    NO_STREAM,
    IdempotencyConflict,
    InvalidEvent,
    Ledger,
    NewEvent,
    VersionConflict,
)
from ledger.cluster import Cluster
from ledger.events import MAX_DATA_BYTES
from ledger.store import _EXEC_ONE, CHANNEL


def app_created(name: str) -> NewEvent:
    return NewEvent("AppCreated", {"name": name, "owner": "ann"}, {"actor": "ann"})


def beat(host: str, n: int = 0) -> NewEvent:
    return NewEvent("HostHeartbeat", {"host_id": host, "instances": n})


def unique_app() -> str:
    return "t" + uuid.uuid4().hex[:12]


def test_append_then_read_back(ledger: Ledger) -> None:
    name = unique_app()
    result = ledger.append(f"app-{name}", [app_created(name)], expected_version=NO_STREAM)
    assert result.versions == (1,) and not result.duplicate
    head = ledger.sequence()
    (event,) = ledger.read_stream(f"app-{name}")
    assert event.type == "AppCreated"
    assert {k: event.data[k] for k in ("name", "owner")} == {"name": name, "owner": "ann"}
    assert event.metadata["actor"] == "ann" and event.position is not None
    assert event.position <= head
    assert [e.id for e in ledger.read_all(after=event.position - 1, limit=1)] == [event.id]


def test_version_conflict_carries_actual_version_and_writes_nothing(ledger: Ledger) -> None:
    name = unique_app()
    stream = f"app-{name}"
    ledger.append(stream, [app_created(name)], expected_version=NO_STREAM)
    with pytest.raises(VersionConflict) as err:
        ledger.append(stream, [app_created(name)], expected_version=NO_STREAM)
    assert err.value.actual == 1 and err.value.expected == 0
    with pytest.raises(VersionConflict) as err:
        ledger.append(stream, [NewEvent("AppDeleted", {"name": name})], expected_version=5)
    assert err.value.actual == 1 and "version 1" in str(err.value)
    ledger.append(stream, [NewEvent("AppDeleted", {"name": name})], expected_version=1)
    assert ledger.stream_version(stream) == 2


def test_concurrent_exact_version_appends_one_wins(cluster: Cluster) -> None:
    name = unique_app()
    stream = f"app-{name}"
    with Ledger(cluster.dsn()) as ledger:
        ledger.append(stream, [app_created(name)])
    with mp.get_context("fork").Pool(4) as pool:
        outcomes = pool.map(_scale_at_version_1, [(cluster.dsn(), name, n) for n in range(4)])
    assert sorted(outcomes) == ["conflict"] * 3 + ["ok"]


def _scale_at_version_1(args: tuple[str, str, int]) -> str:
    dsn, name, n = args
    with Ledger(dsn) as ledger:
        try:
            ledger.append(f"app-{name}", [NewEvent("ScaleChanged", {"app": name,
                          "scale": {"web": n}})], expected_version=1)
            return "ok"
        except VersionConflict:
            return "conflict"


def test_idempotent_retry_returns_first_result(ledger: Ledger) -> None:
    name = unique_app()
    stream = f"app-{name}"
    events = [app_created(name), NewEvent("ScaleChanged", {"app": name, "scale": {"web": 2}})]
    first = ledger.append(stream, events, expected_version=NO_STREAM, idempotency_key=name)
    again = ledger.append(stream, events, expected_version=NO_STREAM, idempotency_key=name)
    assert again.duplicate and (again.event_ids, again.versions) == (first.event_ids,
                                                                    first.versions)
    also = ledger.append(stream, events, expected_version=ANY, idempotency_key=name)
    assert also.event_ids == first.event_ids
    assert ledger.stream_version(stream) == 2
    with pytest.raises(IdempotencyConflict):
        ledger.append(f"app-{name}x", [app_created(name + "x")], idempotency_key=name)


class _Payload(dict):
    """A dict subclass: never 'plain', so its append takes the general, checked path."""


def test_plain_and_checked_paths_store_the_same_thing(ledger: Ledger) -> None:
    """One plainly valid event takes append's short path; anything else the checked
    one. Both must store identical rows and answer retries and conflicts alike."""
    name = unique_app()
    stream, data = f"app-{name}", {"name": name, "owner": "ann"}
    meta = {"actor": "ann", "note": "é"}
    short = ledger.append(stream, [NewEvent("AppCreated", data, meta)], NO_STREAM,
                          idempotency_key=f"{name}-1")
    checked = ledger.append(stream, [NewEvent("AppCreated", _Payload(data), meta)], 1,
                            idempotency_key=f"{name}-2")
    assert (short.versions, checked.versions) == ((1,), (2,))
    assert short.recorded_at[0] <= checked.recorded_at[0]
    first, second = ledger.read_stream(stream)
    assert (first.data, first.metadata) == (second.data, second.metadata)
    again = ledger.append(stream, [NewEvent("AppCreated", data, meta)], NO_STREAM,
                          idempotency_key=f"{name}-1")
    assert again.duplicate and again.event_ids == short.event_ids
    with pytest.raises(VersionConflict) as err:
        ledger.append(stream, [NewEvent("AppCreated", data, meta)], NO_STREAM)
    assert err.value.actual == 2
    with pytest.raises(IdempotencyConflict):
        ledger.append(f"app-{name}x", [app_created(name + "x")], idempotency_key=f"{name}-1")
    assert ledger.stream_version(stream) == 2


def test_batch_is_one_transaction(ledger: Ledger) -> None:
    name = unique_app()
    stream = f"app-{name}"
    bad_batch = [app_created(name), NewEvent("ScaleChanged", {"app": name, "scale": "lots"})]
    with pytest.raises(InvalidEvent, match="scale"):
        ledger.append(stream, bad_batch)
    assert ledger.stream_version(stream) == 0
    ok = ledger.append(stream, [app_created(name)] + [
        NewEvent("ScaleChanged", {"app": name, "scale": {"web": n}}) for n in range(99)])
    assert ok.versions == tuple(range(1, 101))
    ledger.sequence()
    positions = [e.position for e in ledger.read_stream(stream)]
    assert positions == list(range(positions[0], positions[0] + 100))


@pytest.mark.parametrize(
    ("stream", "event", "field"),
    [
        ("app-x1", NewEvent("NoSuchThing", {}), "_type"),
        ("app-x1", NewEvent("AppCreated", {"name": "x1"}), "owner"),
        ("app-x1", NewEvent("AppCreated", {"name": "UPPER", "owner": "a"}), "name"),
        ("host-x1", NewEvent("AppCreated", {"name": "xyz", "owner": "a"}), "_stream"),
        ("no_category", NewEvent("AppCreated", {"name": "xyz", "owner": "a"}), "_stream"),
        ("app-x1", NewEvent("AppCreated", {"name": "xyz", "owner": "a" * 201}), "owner"),
        ("app-x1", NewEvent("AppCreated", {"name": "xyz", "owner": "a"},
                            {"big": "m" * 5000}), "_metadata"),
        ("backup-x1", NewEvent("BackupFailed", {"backup_id": "b", "target": "t",
                                                "error": "e" * MAX_DATA_BYTES}), "_size"),
    ],
)
def test_bad_events_are_refused_and_nothing_is_written(
        ledger: Ledger, stream: str, event: NewEvent, field: str) -> None:
    head_before = ledger.sequence()
    with pytest.raises(InvalidEvent) as err:
        ledger.append(stream, [event])
    assert field in err.value.fields, err.value.fields
    assert str(err.value)
    assert ledger.sequence() == head_before


def test_empty_and_oversized_batches_are_refused(ledger: Ledger) -> None:
    with pytest.raises(InvalidEvent, match="nothing"):
        ledger.append("app-x1", [])
    with pytest.raises(InvalidEvent, match="at most"):
        ledger.append("heartbeat-x1", [beat("x1")] * 1001)


def test_negative_read_position_is_refused(ledger: Ledger) -> None:
    with pytest.raises(InvalidEvent, match=">= 0"):
        ledger.read_all(after=-1)


# --- no reader ever skips an event ---------------------------------------------------------

WRITERS, PER_WRITER, READERS = 8, 2000, 3


def _slow_writer(args: tuple[str, str, int]) -> int:
    """Appends PER_WRITER heartbeats; every fourth one holds its transaction open for a
    random few milliseconds before COMMIT, so commits land out of id order."""
    dsn, run, w = args
    rng = random.Random(w)
    with Ledger(dsn) as ledger:
        stream = f"heartbeat-{run}-w{w}"
        for n in range(PER_WRITER):
            if n % 4:
                ledger.append(stream, [beat(stream, n)])
                continue
            cur = ledger.connection().cursor()
            cur.execute("BEGIN")
            cur.execute(_EXEC_ONE, (stream, "heartbeat", "HostHeartbeat",
                                    f'{{"host_id": "{stream}", "instances": {n}}}',
                                    '{"schema": 1}', uuid.uuid4().hex, None))
            cur.execute("SELECT pg_sleep(%s)", (rng.uniform(0, 0.02),))
            cur.execute("COMMIT")
            cur.execute(f"NOTIFY {CHANNEL}")
    return PER_WRITER


def _tailing_reader(args: tuple[str, str, int, int]) -> list[tuple[int, int, str, int]]:
    """Follows the ledger from `start` with a checkpoint until it has every event of the
    run, sequencing itself as well (several sequencers at once must be safe)."""
    dsn, run, start, r = args
    seen: list[tuple[int, int, str, int]] = []
    checkpoint = start
    deadline = time.monotonic() + 240
    with Ledger(dsn) as ledger:
        while len(seen) < WRITERS * PER_WRITER and time.monotonic() < deadline:
            if r == 0:
                ledger.sequence()
            batch = ledger.read_all(after=checkpoint, limit=500, categories=["heartbeat"])
            for e in batch:
                if e.stream.startswith(f"heartbeat-{run}-"):
                    seen.append((e.position, e.id, e.stream, e.version))
            if batch:
                checkpoint = batch[-1].position
            else:
                time.sleep(0.005)  # a reader's poll interval, not synchronisation
    return seen


@pytest.mark.slow
def test_concurrent_writers_and_tailing_readers_agree(cluster: Cluster, relays) -> None:
    run = uuid.uuid4().hex[:8]
    with Ledger(cluster.dsn()) as ledger:
        start = ledger.sequence()
    ctx = mp.get_context("fork")
    with ctx.Pool(WRITERS + READERS) as pool:
        readers = pool.map_async(_tailing_reader,
                                 [(cluster.dsn(), run, start, r) for r in range(READERS)])
        written = pool.map(_slow_writer, [(cluster.dsn(), run, w) for w in range(WRITERS)])
        seen = readers.get(timeout=300)
    assert sum(written) == WRITERS * PER_WRITER
    first = seen[0]
    assert len(first) == WRITERS * PER_WRITER
    assert len({e[1] for e in first}) == len(first), "duplicates"
    for other in seen[1:]:
        assert other == first, "readers disagree on the order"
    positions = [e[0] for e in first]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    by_stream: dict[str, list[int]] = {}
    for _, _, stream, version in first:
        by_stream.setdefault(stream, []).append(version)
    assert all(v == list(range(1, PER_WRITER + 1)) for v in by_stream.values())
