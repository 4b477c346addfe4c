"""Running projectors against PostgreSQL: one batch of events per transaction, rows and
checkpoint together, so `kill -9` at any moment neither repeats nor skips an event.

`Runner` drives one projector over one connection. `catch_up` feeds several runners from
one read of the ledger. `serve` is the `tally serve projectors` daemon: catch up from the
checkpoints, then follow (ZeroMQ wake-up from the relays, plus a poll timer; it sequences
the ledger itself so it never depends on the relays being up).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import psycopg2

from ledger import Ledger, LedgerUnavailable, RecordedEvent
from ledger.subscriber import Subscriber
from projectors.projector import HandlerFailed, Projector
from projectors.store import (
    Writer,
    load_tables,
    lock_checkpoint,
    lock_checkpoints,
    save_checkpoints,
    save_error,
    set_schema,
)

log = logging.getLogger("tally.projectors")
BATCH = 5000
FLUSH_EVERY = 250_000



def _at(event: RecordedEvent) -> int:
    """An event's position: every event a projector is given was read in the ledger's
    order, so it has one."""
    assert event.position is not None, f"unsequenced event {event.id} given to a projector"
    return event.position

class Runner:
    """One projector over one connection. With `checkpointed`, its position lives in
    views.projector_checkpoints and each batch locks that row first: a rebuild swapping
    the tables bumps `generation`, and the runner reloads. Without, it starts empty at
    position 0 (rebuilds and replays)."""

    def __init__(self, projector: Projector, conn: Any, *, checkpointed: bool = True,
                 flush_every: int = 0) -> None:
        self.projector = projector
        self.conn = conn
        self.checkpointed = checkpointed
        self.flush_every = flush_every
        """Unless checkpointed: keep rows in memory and write them every this many events
        (and on `flush`): a rebuild then writes each row a few times, not per batch."""
        self.pending = 0
        self.writer = Writer()
        self.tables = projector.new_tables()
        self.position = 0
        self.generation = 0
        self.stale = False
        self.stopped: HandlerFailed | None = None

    @property
    def name(self) -> str:
        return self.projector.name

    def start(self) -> None:
        """Load position and rows. A projector stopped by a failing handler is retried
        (its error clears once it gets past that event)."""
        with self.conn, self.conn.cursor() as cur:
            if self.checkpointed:
                self.position, self.generation, _, _ = lock_checkpoint(cur, self.name,
                                                                       create=True)
            self.tables = load_tables(cur, self.projector)
        self.stale = False
        self.stopped = None

    def apply(self, events: Sequence[RecordedEvent], head: int) -> None:
        """Apply the events beyond our position in one transaction. On a handler error,
        commit those before it and stop with the failing event in the status."""
        if self.stopped or not events or _at(events[-1]) <= self.position:
            return
        if self.stale:
            self.start()
        if not self.checkpointed:
            self._apply_unwritten(events, head)
            return
        try:
            with self.conn, self.conn.cursor() as cur:
                self._check_generation(cur)  # also makes two daemons take turns safely
                self.apply_within(cur, [e for e in events if _at(e) > self.position], head)
        except HandlerFailed as failed:
            self._stop(failed, events, head)
        except psycopg2.DatabaseError as exc:
            if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
                raise
            self._blame(events, head, exc)

    def _apply_unwritten(self, events: Sequence[RecordedEvent], head: int) -> None:
        todo = [e for e in events if _at(e) > self.position]
        try:
            self.projector.apply(self.tables, todo)
        except HandlerFailed as failed:
            self.stopped = failed
            return
        self.position = _at(todo[-1])
        self.pending += len(todo)
        if self.pending >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write what is still only in memory."""
        with self.conn, self.conn.cursor() as cur:
            self.writer.write(cur, self.tables)
        self.pending = 0

    def apply_within(self, cur: Any, events: Sequence[RecordedEvent], head: int) -> None:
        """Apply and write inside the caller's transaction."""
        if not events:
            return
        try:
            self.projector.apply(self.tables, events)
            self.writer.write(cur, self.tables)
        except BaseException:
            self.stale = True  # rows hold a partial batch: reload before reuse
            raise
        last = events[-1]
        if self.checkpointed:
            save_checkpoints(cur, [(self.name, _at(last), last.recorded_at)], head)
        self.position = _at(last)

    def _check_generation(self, cur: Any) -> None:
        """Lock our checkpoint row; if a rebuild swapped our tables, reload them."""
        position, generation, _, _ = lock_checkpoint(cur, self.name)
        self.reload_if_moved(cur, position, generation)

    def reload_if_moved(self, cur: Any, position: int, generation: int) -> None:
        """The locked checkpoint is not where we left it: a rebuild (or another daemon)
        moved it. Reload our rows from it."""
        if (position, generation) != (self.position, self.generation):
            log.info("projector %s was rebuilt or moved (generation %s): reloading",
                     self.name, generation)
            self.position, self.generation = position, generation
            self.tables = load_tables(cur, self.projector)

    def _stop(self, failed: HandlerFailed, events: Sequence[RecordedEvent], head: int) -> None:
        """Keep what came before the failing event, then stop with it in the status."""
        log.error("%s", failed)
        self.start()
        before = [e for e in events if self.position < _at(e) < _at(failed.event)]
        with self.conn, self.conn.cursor() as cur:
            if self.checkpointed:
                lock_checkpoint(cur, self.name)
            self.apply_within(cur, before, head)
            if self.checkpointed:
                save_error(cur, self.name, _at(failed.event), failed.event.type,
                           f"{type(failed.error).__name__}: {failed.error}")
        self.stopped = failed

    def _blame(self, events: Sequence[RecordedEvent], head: int, exc: Exception) -> None:
        """The database refused a batch (not a lost connection): redo it one event per
        transaction to find the event, then stop there."""
        log.warning("projector %s: batch refused (%s); retrying one by one", self.name, exc)
        self.start()
        for event in [e for e in events if _at(e) > self.position]:
            try:
                with self.conn, self.conn.cursor() as cur:
                    self.apply_within(cur, [event], head)
            except (HandlerFailed, psycopg2.DatabaseError) as error:
                if isinstance(error, psycopg2.OperationalError | psycopg2.InterfaceError):
                    raise
                cause = error.error if isinstance(error, HandlerFailed) else error
                self._stop(HandlerFailed(self.name, event, cause, 0), events, head)
                return


def catch_up(runners: Sequence[Runner], ledger: Ledger, head: int, batch: int = BATCH,
             stop: threading.Event | None = None) -> int:
    """Feed every running runner up to `head` (or until `stop` is set), reading each event
    once. Returns the number of events read."""
    read = 0
    active = [r for r in runners if not r.stopped]
    cursor = min((r.position for r in active), default=head)
    while cursor < head and not (stop is not None and stop.is_set()):
        events = ledger.read_batch(cursor, min(head, cursor + batch))
        cursor = min(head, cursor + batch)
        if not events:
            continue  # a hole left by retention
        read += len(events)
        together = [r for r in active if r.checkpointed]
        if together and len({id(r.conn) for r in together}) == 1:
            apply_together(together, events, head)
            alone = [r for r in active if not r.checkpointed]
        else:
            alone = active
        for runner in alone:
            runner.apply(events, head)
        active = [r for r in active if not r.stopped]
        if not active:
            break
    return read


def apply_together(runners: Sequence[Runner], events: Sequence[RecordedEvent],
                   head: int) -> None:
    """Apply a batch for several checkpointed runners sharing one connection in one
    transaction: one lock, one checkpoint update, one commit (the live path's latency).
    A handler error stops only its runner (`_stop`); a write the database refuses sends
    every runner down its own path, one transaction each, to find the culprit."""
    todo = [r for r in runners if not r.stopped and _at(events[-1]) > r.position]
    if not todo:
        return
    for runner in todo:
        if runner.stale:
            runner.start()
    conn = todo[0].conn
    failed: list[tuple[Runner, HandlerFailed]] = []
    done: list[tuple[Runner, RecordedEvent]] = []
    try:
        with conn, conn.cursor() as cur:
            locked = lock_checkpoints(cur, [r.name for r in todo])
            for runner in todo:
                runner.reload_if_moved(cur, *locked[runner.name])
                mine = [e for e in events if _at(e) > runner.position]
                if not mine:
                    continue
                try:
                    runner.projector.apply(runner.tables, mine)
                except HandlerFailed as failure:
                    runner.stale = True
                    failed.append((runner, failure))
                    continue
                runner.writer.write(cur, runner.tables)
                done.append((runner, mine[-1]))
            save_checkpoints(cur, [(r.name, _at(e), e.recorded_at) for r, e in done], head,
                             notify=True)
    except psycopg2.DatabaseError as exc:
        for runner in todo:
            runner.stale = True
        if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
            raise
        for runner in todo:
            runner.apply(events, head)
        return
    except BaseException:
        for runner in todo:
            runner.stale = True
        raise
    for runner, last in done:
        runner.position = _at(last)
    for runner, why in failed:
        runner._stop(why, events, head)


def connect(dsn: str, schema: str, application_name: str) -> Any:
    """A connection for projecting into `schema` (not autocommit: we own transactions).

    Commits are asynchronous: views are derived, and a crash (or a failover) can only lose
    a suffix of view transactions, each with its own checkpoint, so the projector simply
    applies those events again. Waiting for the synchronous standby on every batch would
    only add latency."""
    conn = psycopg2.connect(dsn, application_name=application_name)
    with conn.cursor() as cur:
        cur.execute("SET synchronous_commit = off")
    set_schema(conn, schema)
    return conn


def serve(dsn: str, endpoints: Sequence[str], projectors: Sequence[Projector], *,
          stop: threading.Event, poll_interval: float = 1.0, batch: int = BATCH) -> None:
    """The daemon: catch up, then follow until `stop` is set. A lost primary makes it
    reconnect and reload from the checkpoints; a failing handler stops only its projector."""
    sub = Subscriber(endpoints) if endpoints else None
    try:
        while not stop.is_set():
            try:
                _follow(dsn, sub, projectors, stop, poll_interval, batch)
            except (psycopg2.OperationalError, psycopg2.InterfaceError, LedgerUnavailable) as exc:
                log.warning("projectors lost the ledger (%s); reconnecting", exc)
                stop.wait(0.5)
    finally:
        if sub is not None:
            sub.close()


def _follow(dsn: str, sub: Subscriber | None, projectors: Sequence[Projector],
            stop: threading.Event, poll_interval: float, batch: int) -> None:
    conn = connect(dsn, "views", "tally-projectors")
    ledger = Ledger(dsn, notify=False, retry_deadline=5.0, application_name="tally-projectors")
    try:
        runners = [Runner(p, conn) for p in projectors]
        for runner in runners:
            runner.start()
        log.info("projectors at %s", {r.name: r.position for r in runners})
        woken: int | None = None
        while not stop.is_set():
            # Woken by a relay, read up to the head it announced: it sequenced that far
            # already, and sequencing again would only wait for the relay's next batch
            # (an advisory lock) on the way of every route change. On the timer, sequence
            # here, so views never depend on a relay being up.
            head = woken if woken is not None else ledger.sequence()
            catch_up(runners, ledger, head, batch, stop)  # SIGTERM: stop between batches
            _resume_rebuilt(runners)
            if sub is not None:
                woken = sub.wait(poll_interval)
            else:
                stop.wait(poll_interval)
    finally:
        ledger.close()
        conn.close()


def _resume_rebuilt(runners: Sequence[Runner]) -> None:
    """A stopped projector resumes once a rebuild has replaced its tables."""
    for runner in runners:
        if runner.stopped is None:
            continue
        with runner.conn, runner.conn.cursor() as cur:
            generation = lock_checkpoint(cur, runner.name)[1]
        if generation != runner.generation:
            runner.start()
