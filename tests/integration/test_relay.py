"""Wake-ups: relays PUBlish every append; losing one relay, or a NOTIFY, loses nothing."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from ledger import Ledger, NewEvent
from ledger.relay import Relay, app_topic, host_topic
from ledger.store import NOTIFY_EVERY_S, RELAY_HOT_S
from ledger.subscriber import Subscriber
from tests.conftest import free_ports
from tests.waiting import wait_until


@pytest.fixture
def subscriber(relays) -> Iterator[Subscriber]:
    sub = Subscriber(relays.endpoints)
    # Relays republish the head every poll tick: hearing one proves we are connected.
    wait_until(lambda: sub.wait(0.2) is not None, 10, "no relay heard")
    yield sub
    sub.close()


def append_one(ledger: Ledger) -> int:
    host = "h" + uuid.uuid4().hex[:8]
    (event_id,) = ledger.append(f"heartbeat-{host}", [NewEvent("HostHeartbeat",
                                {"host_id": host})]).event_ids
    return event_id


def woken_for(sub: Subscriber, ledger: Ledger, event_id: int, timeout: float) -> float:
    """Seconds until the subscriber hears a head covering event_id."""
    start = time.monotonic()
    position = wait_until(lambda: ledger.positions_of([event_id]).get(event_id), timeout,
                          "event never sequenced")
    while sub.head < position:
        if sub.wait(max(0.0, timeout - (time.monotonic() - start))) is None:
            raise AssertionError(f"no wake-up for position {position} within {timeout}s")
    return time.monotonic() - start


def test_append_wakes_subscriber(subscriber: Subscriber, ledger: Ledger) -> None:
    for _ in range(5):
        # Generous: the figure itself is measured in bench/ledger.py (target p99 10 ms).
        assert woken_for(subscriber, ledger, append_one(ledger), timeout=2.0) < 2.0


def test_a_burst_wakes_for_every_append(subscriber: Subscriber, ledger: Ledger) -> None:
    """Most of these appends skip their NOTIFY (one per NOTIFY_EVERY_S per writer): the
    relays, hot since the first one, still wake us for each."""
    for _ in range(50):
        woken_for(subscriber, ledger, append_one(ledger), timeout=2.0)


def test_skipping_notifies_is_safe_by_construction() -> None:
    assert NOTIFY_EVERY_S * 2 <= RELAY_HOT_S


def test_killing_one_relay_loses_no_wakeup(relays, subscriber: Subscriber,
                                           ledger: Ledger) -> None:
    relays.kill(0)
    try:
        for _ in range(5):
            woken_for(subscriber, ledger, append_one(ledger), timeout=2.0)
    finally:
        relays.start(0)
        relays.wait_ready(0)


def test_lost_notify_is_covered_by_the_poll(cluster, subscriber: Subscriber) -> None:
    """A writer killed between COMMIT and NOTIFY: the relays' poll timer still wakes us."""
    with Ledger(cluster.dsn(), notify=False) as silent:
        event_id = append_one(silent)
        # Relays poll every 0.5 s in tests; nobody else sequences this event.
        woken_for(subscriber, silent, event_id, timeout=5.0)


def test_subscriber_times_out_quietly(relays) -> None:
    sub = Subscriber(["tcp://127.0.0.1:1"])  # nobody there: a poll, not an error
    try:
        assert sub.wait(0.05) is None
    finally:
        sub.close()


@pytest.fixture
def two_relays(cluster) -> Iterator[list[tuple[Relay, threading.Thread]]]:
    """Two relays in this process, with their own leader lock (the session's relay
    processes hold the default one) and a poll timer too slow to matter here."""
    endpoints = [f"tcp://127.0.0.1:{p}" for p in free_ports(2)]
    lock = 7_000_000 + uuid.uuid4().int % 1_000_000
    relays = [Relay(cluster.dsn(), e, poll_interval=60.0, leader_lock=lock)
              for e in endpoints]
    pairs = [(r, threading.Thread(target=r.run, daemon=True)) for r in relays]
    for _, t in pairs:
        t.start()
    yield pairs
    for r, t in pairs:
        r.stop.set()
        t.join(5)


def test_one_relay_polls_the_other_takes_over(two_relays, ledger: Ledger, cluster) -> None:
    """While writers are busy only the leader sequences (a second caller would double the
    sequencer's work); when it dies the other takes over."""
    relays = [r for r, _ in two_relays]
    sub = Subscriber([r.endpoint for r in relays])

    def woken_after_notify() -> bool:
        with Ledger(cluster.dsn()) as fresh:  # a writer's first append always NOTIFYs
            try:
                woken_for(sub, fresh, append_one(fresh), timeout=0.5)
                return True
            except AssertionError:  # relays not listening yet, or we joined late
                return False
    try:
        wait_until(woken_after_notify, 10, "no relay woke us")
        before = [r.sequenced for r in relays]
        # 100 appends over ~1 s: a handful of NOTIFYs, the rest found by polling alone.
        for _ in range(100):
            woken_for(sub, ledger, append_one(ledger), timeout=2.0)
        calls = [r.sequenced - b for r, b in zip(relays, before, strict=True)]
        (leader, thread), = [(r, t) for r, t in two_relays if r.leader]
        follower = next(r for r in relays if r is not leader)
        assert calls[relays.index(follower)] <= 1, calls  # its 60 s poll timer at most

        leader.stop.set()  # it closes its session, and so its lock goes
        thread.join(5)
        assert not thread.is_alive()
        assert wait_until(woken_after_notify, 10, "no relay woke us after the leader left")
        with Ledger(cluster.dsn(), notify=False) as silent:
            for _ in range(20):  # no NOTIFY and a 60 s poll timer: only a leader's polling
                woken_for(sub, silent, append_one(silent), timeout=0.9)
        assert follower.leader
    finally:
        sub.close()


def placement_event(ledger: Ledger, app: str, host: str | None) -> int:
    """An InstancePlaced on `host`, or (None) an InstanceUnplaced of the app's instance."""
    stream = f"placement-{app}"
    if host is None:
        event = NewEvent("InstanceUnplaced", {"instance_id": f"{app}.1.web.x", "app": app})
    else:
        event = NewEvent("InstancePlaced", {"instance_id": f"{app}.1.web.x", "app": app,
                                            "release": 1, "process_type": "web",
                                            "host_id": host, "port": 20000})
    (event_id,) = ledger.append(stream, [event]).event_ids
    return event_id


def test_a_host_wakes_for_its_own_desired_state_only(relays, subscriber: Subscriber,
                                                      ledger: Ledger) -> None:
    """10,000 agents must not all wake at each of the ledger's moves (heartbeats move it all
    the time): an agent follows its host's topic and its apps', and relays publish those
    only past events that move them (ledger.rules.DESIRED_EVENTS)."""
    tag = uuid.uuid4().hex[:6]
    me, other, app = f"h{tag}a", f"h{tag}b", f"app{tag}"
    host = Subscriber(relays.endpoints, topics=[host_topic(me)])
    try:
        opened = host.heard
        # the relays' poll ticks reach it, and wake it not
        wait_until(lambda: host.wait(0.3) is None and host.heard > opened, 10,
                   "no relay's tick heard")

        def quiet_after(event_id: int) -> None:
            woken_for(subscriber, ledger, event_id, timeout=5.0)  # published by now
            assert host.wait(0.5) is None, "woken for another host's move"

        quiet_after(append_one(ledger))  # a heartbeat
        quiet_after(placement_event(ledger, app, other))
        placed = placement_event(ledger, app, me)
        woken_for(host, ledger, placed, timeout=5.0)

        host.follow([host_topic(me), app_topic(app)])  # the app is placed here now
        woken_for(host, ledger, placement_event(ledger, app, None), timeout=5.0)
        host.follow([host_topic(me)])
        quiet_after(placement_event(ledger, app, None))
    finally:
        host.close()
