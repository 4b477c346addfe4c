"""The lost acknowledgement: an append is acknowledged only once durable on the standby.

With the synchronous standby down, a commit waits for it. PostgreSQL ends that wait on a
cancel (success plus a WARNING), on a terminated session, or on a restart of the primary
(the transaction is then committed locally only, and an idempotent retry finds its key).
None of those may be reported as a success, and such an event must never get a position
while it exists on the primary alone: a failover to the standby would give that position
to another event, and a reader checkpointed past it would never see that one.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator

import pytest

from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from ledger.errors import OutcomeUnknown
from tests.conftest import destroy_cluster, make_cluster, on_node
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def pair() -> Iterator[Cluster]:
    c = make_cluster()
    yield c
    destroy_cluster(c)


@pytest.fixture
def standby_down(pair: Cluster) -> Iterator[Cluster]:
    """The pair with its synchronous standby stopped; started again afterwards."""
    primary = pair.primary()
    standby = pair.other(primary)
    pair.stop_node(standby)
    yield pair
    pair.start_node(primary)
    pair.start_node(standby)
    pair.wait_streaming(primary, standby)


class Append(threading.Thread):
    """One append in the background: its result or its exception."""

    def __init__(self, dsn: str, key: str, retry_deadline: float = 20.0) -> None:
        super().__init__(daemon=True)
        self.ledger = Ledger(dsn, retry_deadline=retry_deadline,
                             confirm_timeout=1.0)
        self.key = key
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            # Open the connection first, so the append goes the hot path.
            self.ledger.stream_version("heartbeat-lostack")
            self.result = self.ledger.append(
                "heartbeat-lostack", [NewEvent("HostHeartbeat", {"host_id": self.key})],
                idempotency_key=self.key)
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            self.ledger.close()


def on_primary(cluster: Cluster, sql: str, args: tuple = ()) -> list[tuple]:
    return on_node(cluster, cluster.primary(), sql, args)


def waiting_pid(cluster: Cluster) -> int:
    """The backend whose COMMIT waits for the synchronous standby."""
    rows = wait_until(lambda: on_primary(
        cluster, "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'"), 20,
        "the append never waited for the standby")
    return rows[0][0]


def committed_locally(cluster: Cluster, key: str) -> bool:
    return bool(on_primary(cluster, "SELECT 1 FROM ledger.events WHERE idempotency_key = %s",
                           (key,)))


def unplaced(cluster: Cluster, key: str) -> bool:
    """The event exists on the primary but the sequencer gave it no position."""
    with Ledger(cluster.dsn()) as ledger:
        ledger.sequence()
    return not on_primary(cluster, "SELECT 1 FROM ledger.events e JOIN ledger.positions p "
                          "ON p.event_id = e.id WHERE e.idempotency_key = %s", (key,))


def end_wait_by(how: str) -> Callable[[Cluster, int], None]:
    def cancel(cluster: Cluster, pid: int) -> None:
        on_primary(cluster, "SELECT pg_cancel_backend(%s)", (pid,))

    def terminate(cluster: Cluster, pid: int) -> None:
        on_primary(cluster, "SELECT pg_terminate_backend(%s)", (pid,))

    def restart(cluster: Cluster, pid: int) -> None:
        primary = cluster.primary()
        cluster.stop_node(primary, mode="immediate")
        cluster.start_node(primary)
    return {"cancel": cancel, "terminate": terminate, "restart": restart}[how]


@pytest.mark.parametrize("how", ["cancel", "terminate", "restart"])
def test_an_append_whose_replication_wait_ended_is_not_acknowledged(
        standby_down: Cluster, how: str) -> None:
    cluster = standby_down
    key = f"lost-ack-{how}"
    append = Append(cluster.dsn(), key)
    append.start()
    end_wait_by(how)(cluster, waiting_pid(cluster))
    append.join(60)
    assert not append.is_alive()
    assert append.result is None, f"acknowledged while only on the primary: {append.result}"
    assert isinstance(append.error, OutcomeUnknown), append.error
    assert committed_locally(cluster, key)  # the case that matters: the commit happened
    assert unplaced(cluster, key), "a position was given to an event only on the primary"

    # With the standby back, the same key is confirmed and acknowledged, once.
    standby = cluster.other(cluster.primary())
    cluster.start_node(standby)
    cluster.wait_streaming(cluster.primary(), standby)
    with Ledger(cluster.dsn()) as ledger:
        again = ledger.append("heartbeat-lostack",
                              [NewEvent("HostHeartbeat", {"host_id": key})],
                              idempotency_key=key)
        assert again.duplicate
        wait_until(lambda: ledger.sequence() and ledger.positions_of(again.event_ids), 10,
                   "the confirmed event never got a position")


def test_a_position_read_is_never_given_to_another_event_after_failover() -> None:
    """Standby down, wait cancelled, kill -9 the primary, promote the stale standby: the
    lost event was never acknowledged nor placed, so the positions readers saw before
    hold the same events after."""
    cluster = make_cluster()
    try:
        with Ledger(cluster.dsn()) as ledger:
            ledger.append("heartbeat-before", [NewEvent("HostHeartbeat", {"host_id": "x"})])
            wait_until(lambda: ledger.sequence() >= 1, 10, "never sequenced")
            seen = [(e.position, e.id) for e in ledger.read_all()]
        cluster.stop_node("b")
        append = Append(cluster.dsn(), "doomed")
        append.start()
        on_primary(cluster, "SELECT pg_cancel_backend(%s)", (waiting_pid(cluster),))
        append.join(30)
        assert isinstance(append.error, OutcomeUnknown), append.error
        with Ledger(cluster.dsn()) as ledger:
            head = ledger.sequence()
            seen_a = [(e.position, e.id) for e in ledger.read_all()]
        assert head == len(seen) and seen_a == seen  # the doomed event was never read

        os.kill(cluster.postmaster_pid("a"), signal.SIGKILL)
        wait_until(lambda: not cluster._running("a"), 20, "a survived kill -9")
        cluster.promote("b")
        with Ledger(cluster.dsn(), retry_deadline=30) as ledger:
            ledger.append("heartbeat-after", [NewEvent("HostHeartbeat", {"host_id": "y"})])
            wait_until(lambda: ledger.sequence() > head, 10, "never sequenced on b")
            after = [(e.position, e.id, e.stream) for e in ledger.read_all()]
        assert [(p, i) for p, i, _ in after[:len(seen)]] == seen
        assert [s for _, _, s in after[len(seen):]] == ["heartbeat-after"]
    finally:
        destroy_cluster(cluster)
