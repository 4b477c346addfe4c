"""The relay: LISTEN on the primary, sequence new events, PUBlish "ledger moved to P".

Run two (`tally serve relay --endpoint ...`). Both LISTEN; one of them, the leader (it
holds a session advisory lock), sequences on each NOTIFY and then stays hot for two
seconds, sequencing every 4 ms, so writers need not NOTIFY every append (ledger/store.py
explains the pact). A call that places anything has a fixed server cost before its first
event, so while the ledger is busy (the last call placed BUSY_BATCH or more) the leader
waits 16 ms between calls: under load, wake-ups come up to 12 ms later and that fixed cost
is shared by more events (the figures are in the README). The other relay, the follower, only
sequences on its poll timer: a second caller would double the sequencer's work for
nothing, since each call places everything committed. A NOTIFY makes the follower hot
too, and while hot it asks for the lock every LEADER_TRY_S; the lock goes with the
leader's session, so when the leader dies or loses its connection, the follower takes
over within that time. Both publish the head (the poll timer republishes it), so a
subscriber connected to both loses no wake-up with one gone. A published head is only a
hint; subscribers read from their own checkpoint and poll too.

Wire format: a two-frame ZeroMQ message `[b"ledger", b"<position>"]`. The relay also
republishes the head on every poll tick, so a subscriber that joined late catches up.

Host agents subscribe to topics of their own instead, so that 10,000 of them do not all
wake whenever the ledger moves (2,000 heartbeats a second move it all the time): when the
head moves past events that change desired states (ledger.rules.DESIRED_EVENTS), the
relay also publishes `[b"host/<id>/", P]` for each host they name and `[b"app/<name>/", P]`
for each app named without a host (an instance unplaced, a rollout), which the hosts
running that app follow, P being the position of the last such event (not the head: the
other relay, publishing the same events later with a later head, must not wake a host
twice); and `[b"tick", head]` on every poll tick, which tells such a subscriber a relay
is there without waking it.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Iterable
from typing import Any

import psycopg2
import zmq

from ledger import curve as curve_keys
from ledger.errors import LedgerUnavailable
from ledger.rules import DESIRED_EVENTS
from ledger.store import CHANNEL, RELAY_HOT_S, Ledger

TOPIC = b"ledger"
TICK = b"tick"
MOVES_SCAN_MAX = 50_000
"""The most positions read at once for per-host topics: a relay far behind (just started)
publishes only the head for what lies further back; agents poll anyway."""
HOT_POLL_S = 0.004
"""While hot, how often the leader sequences without being told (see ledger/store.py)."""
BUSY_POLL_S = 0.016
"""... and how often while busy: the last call placed at least BUSY_BATCH events."""
BUSY_BATCH = 8
IDLE_WAIT_S = 0.5
"""The longest a relay waits without looking at its stop flag."""
LEADER_TRY_S = 0.05
"""While hot, how often a follower tries to become the leader."""
LEADER_LOCK = 500152823930
"""Session advisory lock held by the leading relay (ledger.sequence uses ...929)."""
log = logging.getLogger("tally.relay")


class Relay:
    """One relay daemon. `run()` blocks until `stop` is set."""

    def __init__(self, dsn: str, endpoint: str, *, poll_interval: float = 1.0,
                 context: zmq.Context | None = None, leader_lock: int = LEADER_LOCK,
                 curve: tuple[curve_keys.Keypair, curve_keys.Allowed] | None = None) -> None:
        self.dsn = dsn
        self.curve = curve
        """The relay's keypair and who may subscribe (ledger/curve.py); None: open PUB."""
        self.leader_lock = leader_lock
        self.endpoint = endpoint
        self.poll_interval = poll_interval
        self.context = context or zmq.Context.instance()
        self.stop = threading.Event()
        self.published = 0
        self.leader = False
        self.sequenced = 0
        """How many times this relay called the sequencer (tests count them)."""

    def run(self) -> None:
        pub = self.context.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        auth = curve_keys.serve(pub, *self.curve, self.context) if self.curve else None
        pub.bind(self.endpoint)
        # Fail fast inside, reconnect (and LISTEN again) out here.
        ledger = Ledger(self.dsn, retry_deadline=0.0, notify=False,
                        application_name="tally-relay")
        try:
            while not self.stop.is_set():
                try:
                    self._listen_loop(ledger, pub)
                except (LedgerUnavailable, psycopg2.OperationalError,
                        psycopg2.InterfaceError) as exc:
                    log.warning("relay lost the primary (%s); reconnecting", exc)
                    ledger.close()
                    self.stop.wait(0.2)
        finally:
            ledger.close()
            pub.close()
            if auth is not None:
                auth.stop()

    def _listen_loop(self, ledger: Ledger, pub: zmq.Socket) -> None:
        conn = ledger.connection()
        self.leader = False  # a new session holds no lock
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {CHANNEL}")
        log.info("relay listening on %s, publishing on %s", conn.dsn.split(" password")[0],
                 self.endpoint)
        next_tick = hot_until = next_try = 0.0
        busy = False
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_tick:  # the poll backstop: covers a writer killed before NOTIFY
                self._publish(pub, self._sequence(ledger), ledger, force=True)
                next_tick = now + self.poll_interval
            if now < hot_until and not self.leader and now >= next_try:
                self.leader = self._try_lead(conn)
                next_try = now + LEADER_TRY_S
            if now >= hot_until:
                wait = min(next_tick - now, IDLE_WAIT_S)
            elif self.leader:
                wait = BUSY_POLL_S if busy else HOT_POLL_S
            else:
                wait = min(next_try, hot_until) - now
            # A NOTIFY that came in during our own queries is already in conn.notifies
            # and will not make the socket readable again.
            heard = bool(conn.notifies)
            if not heard and select.select([conn], [], [], max(0.0, wait))[0]:
                conn.poll()
                heard = bool(conn.notifies)
                if not heard:
                    continue
            if heard:
                conn.notifies.clear()
                if time.monotonic() >= hot_until:
                    next_try = 0.0  # just woken: ask for the lead at once
                hot_until = time.monotonic() + RELAY_HOT_S
            if not self.leader:
                continue  # the leader heard the same NOTIFY and sequences for both
            if time.monotonic() < hot_until:
                head = self._sequence(ledger)
                busy = head - self.published >= BUSY_BATCH
                if self._publish(pub, head, ledger):
                    hot_until = time.monotonic() + RELAY_HOT_S

    def _sequence(self, ledger: Ledger) -> int:
        self.sequenced += 1
        return ledger.sequence()

    def _try_lead(self, conn: Any) -> bool:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (self.leader_lock,))
            won = bool(cur.fetchone()[0])
        if won:
            log.info("relay leads: it polls while writers are busy")
        return won

    def _publish(self, pub: Any, head: int, ledger: Ledger, force: bool = False) -> bool:
        """Send the head if it moved (or when forced: a poll tick), and the topics of the
        hosts and apps whose desired state it moved past. True if it moved."""
        moved = head > self.published
        at = str(head).encode()
        if moved or force:
            pub.send_multipart([TOPIC, at])
        if moved and 0 < head - self.published <= MOVES_SCAN_MAX and self.published:
            moves = ledger.desired_moves(self.published, head, list(DESIRED_EVENTS))
            for topic, position in sorted(topics(moves).items()):
                pub.send_multipart([topic, str(position).encode()])
        if force:
            pub.send_multipart([TICK, at])
        self.published = max(self.published, head)
        return moved


def host_topic(host_id: str) -> bytes:
    """What a host's agent subscribes to (the trailing / keeps host-1 from host-10's)."""
    return f"host/{host_id}/".encode()


def app_topic(app: str) -> bytes:
    return f"app/{app}/".encode()


def host_wakes(host_id: str, apps: Iterable[str]) -> set[bytes]:
    """What a host's agent subscribes to: its own host's topic and those of the apps
    placed on it."""
    return {host_topic(host_id), *(app_topic(a) for a in apps)}


def topics(moves: Iterable[tuple[str | None, str | None, int]]) -> dict[bytes, int]:
    """The topics to publish, with the last position of each, for events naming (host,
    app) at a position: the host's when named (a placement, a one-off run), else the app's
    (an unplaced instance, a rollout)."""
    out: dict[bytes, int] = {}
    for host, app, position in moves:
        topic = host_topic(host) if host else app_topic(app) if app else None
        if topic is not None:
            out[topic] = max(out.get(topic, 0), position)
    return out
