"""Heartbeats gathered for a short interval and appended together (ledger/batch.py).

A heartbeat is answered at once (202): the agent needs no more than "heard". A thread per
API process appends what came in the last `interval` seconds in one transaction, so 2,000
hosts beating every second cost ten appends a second per process, not 2,000. When the
ledger is away the pending heartbeats wait (up to `max_pending`, the oldest dropped
first: a host's newer beat says more than its older one) and go with the next batch.
What a killed API process had not flushed yet is lost, as a heartbeat on the wire is:
the next one, seconds later, says the same.

Revocation is checked here, once per batch, not per request: the route accepts a heartbeat
on this process's directory of tokens alone (no read of the caller's stream), and before
each append `revoked` says which of the batch's tokens were revoked meanwhile, in one
query; their heartbeats are dropped. So once a revocation's 204 is sent nothing its token
sends is recorded, while a heartbeat costs the ledger nothing but its share of the INSERT.
Until the process's directory refreshes (API `auth_refresh_s`), such a token still gets
202s, which tell it only its host's desired version.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ledger import InvalidEvent, Ledger, LedgerError, NewEvent
from ledger.batch import Item, append_streams

Token = tuple[str, str]
"""(user, token_id) of the token a heartbeat came with."""
Revoked = Callable[[Ledger, set[Token]], set[Token]]

log = logging.getLogger("tally.api.heartbeats")


@dataclass
class Counts:
    accepted: int = 0
    written: int = 0
    batches: int = 0
    dropped: int = 0
    revoked: int = 0
    """Heartbeats not appended: their token was revoked before their batch went."""


class Batcher:
    """Accepts heartbeats from request threads; one thread of its own appends them."""

    def __init__(self, open_ledger: Callable[[], Ledger], interval: float = 0.1,
                 max_batch: int = 5000, max_pending: int = 100_000,
                 revoked: Revoked | None = None) -> None:
        self.open_ledger, self.interval = open_ledger, interval
        self.max_batch, self.max_pending = max_batch, max_pending
        self.revoked = revoked
        self.pending: deque[tuple[Item, Token | None]] = deque()
        self.counts = Counts()
        self._lock = threading.Lock()
        self._pid = 0
        self._nonce = os.urandom(6).hex()
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._unsent: tuple[list[tuple[Item, Token | None]], str] | None = None
        """The batch being sent, or that failed, with its key: sent again first."""

    def _key(self) -> str:
        """A batch's idempotency key (time-ordered: it lands at the index's right edge)."""
        return f"{time.time_ns():016x}{self._nonce}{next(self._keys):x}"

    def submit(self, stream: str, event: NewEvent, token: Token | None = None) -> None:
        """Queue one heartbeat, with the token it came with if that is to be checked
        against revocations."""
        with self._lock:
            if self._pid != os.getpid():  # first use in this (forked) worker process
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="heartbeats",
                                                daemon=True)
                self._thread.start()
            self.pending.append((Item(stream, event), token))
            self.counts.accepted += 1
            while len(self.pending) > self.max_pending:
                self.pending.popleft()
                self.counts.dropped += 1

    def flush(self, ledger: Ledger) -> int:
        """Append what is pending (in batches of max_batch, each with one idempotency key);
        returns events written. On a ledger error the batch is kept, with its key, to be
        sent again as it was before anything newer: if it was written after all (the answer
        was lost), sending it again writes nothing."""
        written = 0
        while True:
            with self._lock:
                if self._unsent is not None:
                    batch, key = self._unsent
                else:
                    batch = [self.pending.popleft()
                             for _ in range(min(self.max_batch, len(self.pending)))]
                    key = self._key()
                self._unsent = (batch, key) if batch else None
            if not batch:
                return written
            items = self._admitted(ledger, batch)
            try:
                n = append_streams(ledger, items, key)
            except InvalidEvent:  # never expected (the route validated): keep the others
                n = sum(self._one(ledger, it) for it in items)
            written += n
            with self._lock:
                self._unsent = None
                self.counts.written += n
                self.counts.batches += 1
                # counted once the batch went: one sent again (a ledger error) is admitted
                # again, and its revoked heartbeats were counted twice
                self.counts.revoked += len(batch) - len(items)
                self._idle.notify_all()
            if len(items) < len(batch):
                log.warning("%d heartbeats dropped: their token was revoked",
                            len(batch) - len(items))

    def _admitted(self, ledger: Ledger, batch: list[tuple[Item, Token | None]]) -> list[Item]:
        """The batch's items but those whose token was revoked (one read for all)."""
        tokens = {t for _, t in batch if t is not None}
        gone = self.revoked(ledger, tokens) if tokens and self.revoked else set()
        return [it for it, t in batch if t not in gone]

    def _one(self, ledger: Ledger, item: Item) -> int:
        try:
            return append_streams(ledger, [item], self._key())
        except InvalidEvent as exc:
            log.error("heartbeat for %s refused: %s", item.stream, exc)
            return 0

    def wait_flushed(self, timeout: float) -> bool:
        """Until nothing is pending (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.pending or self._unsent is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def _run(self) -> None:
        ledger = self.open_ledger()
        while not self._stop.wait(self.interval):
            try:
                self.flush(ledger)
            except LedgerError as exc:
                log.warning("heartbeats not appended yet (%s); keeping %d", exc,
                            len(self.pending))
                ledger.close()
            except Exception:  # never let the thread die: heartbeats would pile up
                log.exception("heartbeat batch failed")
