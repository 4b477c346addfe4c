"""The relay: LISTEN on the primary, sequence new events, PUBlish "ledger moved to P".

Run two (`tally serve relay --endpoint ...`): each sequences (the advisory lock makes them
take turns) and each publishes the head, so losing one loses no wake-up. A published head
is only a hint; subscribers always read from their own checkpoint and poll on a timer too.

A relay that has just seen new events stays hot for a second, sequencing every 4 ms, so
writers need not NOTIFY every append (ledger/store.py explains the pact).

Wire format: a two-frame ZeroMQ message `[b"ledger", b"<position>"]`. The relay also
republishes the head on every poll tick, so a subscriber that joined late catches up.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from typing import Any

import psycopg2
import zmq

from ledger.errors import LedgerUnavailable
from ledger.store import CHANNEL, RELAY_HOT_S, Ledger

TOPIC = b"ledger"
HOT_POLL_S = 0.004
"""While hot, how often a relay sequences without being told (see ledger/store.py)."""
log = logging.getLogger("tally.relay")


class Relay:
    """One relay daemon. `run()` blocks until `stop` is set."""

    def __init__(self, dsn: str, endpoint: str, *, poll_interval: float = 1.0,
                 context: zmq.Context | None = None) -> None:
        self.dsn = dsn
        self.endpoint = endpoint
        self.poll_interval = poll_interval
        self.context = context or zmq.Context.instance()
        self.stop = threading.Event()
        self.published = 0

    def run(self) -> None:
        pub = self.context.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
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

    def _listen_loop(self, ledger: Ledger, pub: zmq.Socket) -> None:
        conn = ledger.connection()
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {CHANNEL}")
        log.info("relay listening on %s, publishing on %s", conn.dsn.split(" password")[0],
                 self.endpoint)
        next_tick = hot_until = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_tick:  # the poll backstop: covers a writer killed before NOTIFY
                self._publish(pub, ledger.sequence(), force=True)
                next_tick = now + self.poll_interval
            wait = next_tick - now if now >= hot_until else HOT_POLL_S
            ready, _, _ = select.select([conn], [], [], max(0.0, wait))
            if ready:
                conn.poll()
                if not conn.notifies:
                    continue
                conn.notifies.clear()
                hot_until = time.monotonic() + RELAY_HOT_S
            elif time.monotonic() >= hot_until:
                continue
            if self._publish(pub, ledger.sequence()):
                hot_until = time.monotonic() + RELAY_HOT_S

    def _publish(self, pub: Any, head: int, force: bool = False) -> bool:
        """Send the head if it moved (or when forced). True if it moved."""
        moved = head > self.published
        if moved or force:
            pub.send_multipart([TOPIC, str(head).encode()])
            self.published = max(self.published, head)
        return moved
