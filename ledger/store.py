"""Append to and read from the ledger.

Ordering. Sequence values are handed out before commit, so a reader of `id > last` loses
events whose transactions commit late. Here writers only insert rows stamped with their
transaction id (`tx_id`, xid8). A sequencer then gives committed events a dense `position`
in (tx_id, id) order, but only for transactions below the oldest still running one
(`pg_snapshot_xmin(pg_current_snapshot())`): nothing can ever commit below that line. Its
batches are serialised by an advisory lock held only by the sequencer, never by writers, so
appends run at insert speed. Readers ask for `position > checkpoint`: one integer, one total
order, identical for every reader, final (dense when given; retention's pruned heartbeats
leave holes, so readers read ranges and never count positions). A writing transaction that
stays open holds every reader back, hence the statement and idle-in-transaction timeouts on
our roles, and the watchdog (agents/watchdog.py) that ends any session holding one too long.

Wake-ups. `pg_notify` inside the append transaction would serialise commits behind the
synchronous standby (the notify queue lock is held through the commit wait). So `append`
commits first, then sends NOTIFY in its own, WAL-free transaction. A relay that hears one
stays "hot" for RELAY_HOT_S, sequencing every few milliseconds, so a writer that notified
less than NOTIFY_EVERY_S ago skips the NOTIFY: the hot relays pick its append up anyway.
Under load that removes a round trip and two backend wake-ups per append; idle, nothing
polls fast. A writer killed between COMMIT and NOTIFY, or a relay restarted while hot,
delays a wake-up until the relays' poll timer, never loses it.

Retries. Every append carries an idempotency key (one is made if the caller gives none), so
after a lost connection or a failover the append is simply sent again: the key makes the
second try return the first result instead of writing twice.

Acknowledgement. An append is acknowledged only once durable on the synchronous standby.
A COMMIT waits for that, but PostgreSQL ends the wait early on a cancel (returning success
with a WARNING), a terminated session or a restarted primary, leaving the transaction
committed on the primary alone; a retry then finds its key. Either way the append is
confirmed against the standby (`ledger.durable_lsn()`, migration 0008, past the primary's
flush position) within `confirm_timeout`, else OutcomeUnknown: the caller sends it again
with the same key. The sequencer places only such durable transactions, so no event is read
at a position that a failover could give to another.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors

from ledger import reads
from ledger.catalogue import CATALOGUE, category_of, stream_category
from ledger.errors import (
    IdempotencyConflict,
    InvalidEvent,
    LedgerUnavailable,
    OutcomeUnknown,
    VersionConflict,
)
from ledger.events import (
    ANY,
    MAX_BATCH,
    MAX_DATA_BYTES,
    MAX_METADATA_BYTES,
    AppendResult,
    NewEvent,
    RecordedEvent,
)
from ledger.payloads import plain_payload, validate_event
from ledger.reads import COLUMNS, head_of, recorded

__all__ = ["COLUMNS", "Ledger", "head_of", "recorded"]  # the readers' names, kept here too

CHANNEL = "tally_ledger"
NOTIFY_EVERY_S = 0.5
"""A writer sends at most one NOTIFY per this many seconds (see the module doc)."""
RELAY_HOT_S = 2.0
"""After new events, a relay keeps sequencing every few ms for this long. Must stay well
above NOTIFY_EVERY_S, so an append whose NOTIFY was skipped always finds a hot relay."""
SYNC_WAIT_CUT = "synchronous replication"
"""In the WARNING PostgreSQL sends when a commit's wait for the standby is cancelled or cut
(lc_messages C, as our clusters run)."""
T = TypeVar("T")

# Prepared once per connection: planning the statement costs more than running it.
_PREPARE = [
    """PREPARE tally_append_one(text, text, text, jsonb, jsonb, text, integer) AS
    INSERT INTO ledger.events (stream, category, version, type, data, metadata, idempotency_key)
    SELECT $1, $2, cur.v + 1, $3, $4, $5, $6
    FROM (SELECT coalesce(max(version), 0) AS v FROM ledger.events WHERE stream = $1) cur
    WHERE $7::integer IS NULL OR cur.v = $7
    RETURNING id, version, recorded_at""",
    """PREPARE tally_append_many(text, text, text[], text[], text[], text, integer) AS
    INSERT INTO ledger.events (stream, category, version, type, data, metadata, idempotency_key)
    SELECT $1, $2, cur.v + t.n, t.type, t.data::jsonb, t.metadata::jsonb,
           CASE WHEN t.n = 1 THEN $6 END
    FROM (SELECT coalesce(max(version), 0) AS v FROM ledger.events WHERE stream = $1) cur,
         unnest($3, $4, $5) WITH ORDINALITY AS t(type, data, metadata, n)
    WHERE $7::integer IS NULL OR cur.v = $7
    ORDER BY t.n
    RETURNING id, version, recorded_at""",
]
_PREPARE += [
    f"""PREPARE tally_read_stream(text, integer, bigint) AS
    SELECT {COLUMNS}
    FROM ledger.events e LEFT JOIN ledger.positions p ON p.event_id = e.id
    WHERE e.stream = $1 AND e.version >= $2 ORDER BY e.version LIMIT $3""",
    """PREPARE tally_stream_version(text) AS
    SELECT coalesce(max(version), 0) FROM ledger.events WHERE stream = $1""",
    # A hot relay calls this every few ms: unprepared, parsing and planning the call
    # cost ~12% of the sequencer's CPU.
    """PREPARE tally_sequence(integer) AS SELECT placed, head FROM ledger.sequence($1)""",
]
_EXEC_ONE = "EXECUTE tally_append_one(%s, %s, %s, %s, %s, %s, %s)"
_EXEC_MANY = "EXECUTE tally_append_many(%s, %s, %s, %s, %s, %s, %s)"


def _compact_json() -> Callable[[Any], str]:
    """Compact JSON, UTF-8 kept as is. json.dumps builds a C encoder object on every call
    (through two Python frames), a cost every append would pay, so this builds CPython's C
    encoder once. No circular-reference check: the payloads are validated plain data."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator (not CPython): the standard way
        return json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                                check_circular=False).encode
    encode = make(None, json.JSONEncoder().default, json.encoder.encode_basestring, None,
                  ":", ",", False, False, True)
    return lambda obj: "".join(encode(obj, 0))


_dumps = _compact_json()
_DISCONNECTED = (psycopg2.OperationalError, psycopg2.InterfaceError,
                 psycopg2.errors.ReadOnlySqlTransaction)
"""Errors after which the append is sent again on a new connection (the key makes it safe);
a statement timeout (QueryCanceled, an OperationalError) is not one of them."""


def _meta_json(metadata: dict[str, Any], schema: int) -> str:
    """An event's stored metadata: the caller's, plus the payload's schema version."""
    return _dumps({**metadata, "schema": schema}) if metadata else f'{{"schema":{schema}}}'


def _timed_out(exc: psycopg2.Error) -> LedgerUnavailable:
    """A statement timeout is not retried: the same statement would time out again."""
    return LedgerUnavailable(f"ledger statement timed out: {exc}")


def _plain_one(stream: str, events: Sequence[NewEvent], key: str,
               expected: int | None) -> tuple | None:
    """The one-event append statement's arguments if nothing about the call is unusual:
    one event, a known type for this stream, a plainly valid payload within the limits;
    else None (the general path then checks all and names what is wrong)."""
    if len(events) != 1 or (expected is not None and expected < 0):
        return None
    ev = events[0]
    et = CATALOGUE.get(ev.type)
    category = category_of(stream)
    if et is None or category is None:
        return None
    payload = plain_payload(et, category, ev.data)
    if payload is None:
        return None
    data = _dumps(payload)
    meta = _meta_json(ev.metadata, et.version)
    if len(data) * 4 > MAX_DATA_BYTES or len(meta) * 4 > MAX_METADATA_BYTES:
        return None
    return stream, et.category, ev.type, data, meta, key, expected


def _encoded(category: str, ev: NewEvent) -> tuple[str, str, str]:
    """An event as (type, data JSON, metadata JSON) for the append statement, validated
    and within the size limits (a plain payload checked without marshmallow, as
    `_plain_one` does: batches of heartbeats and the placer's rounds go this way)."""
    et = CATALOGUE.get(ev.type)
    plain = plain_payload(et, category, ev.data) if et is not None else None
    data = _dumps(plain if plain is not None else validate_event(category, ev.type, ev.data))
    meta = _meta_json(ev.metadata, CATALOGUE[ev.type].version)
    # A str of n characters encodes to at most 4n bytes: most skip the encoding.
    if len(data) * 4 > MAX_DATA_BYTES and len(data.encode()) > MAX_DATA_BYTES:
        raise InvalidEvent(
            f"{ev.type} payload is {len(data.encode())} bytes; the limit is {MAX_DATA_BYTES}",
            {"_size": [f"larger than {MAX_DATA_BYTES} bytes"]})
    if len(meta) * 4 > MAX_METADATA_BYTES and len(meta.encode()) > MAX_METADATA_BYTES:
        raise InvalidEvent(f"metadata larger than {MAX_METADATA_BYTES} bytes",
                           {"_metadata": [f"larger than {MAX_METADATA_BYTES} bytes"]})
    return ev.type, data, meta


class Ledger:
    """A connection to the ledger through a (multi-host) libpq DSN.

    Not thread-safe: give each thread or process its own. Transient connection failures
    are retried until `retry_deadline` seconds have passed, then LedgerUnavailable.
    """

    def __init__(self, dsn: str, *, retry_deadline: float = 30.0, notify: bool = True,
                 application_name: str = "tally", confirm_timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.retry_deadline = retry_deadline
        self.confirm_timeout = confirm_timeout
        self.notify = notify
        self.application_name = application_name
        self._conn: Any = None
        self._cursor: Any = None
        self._last_notify = -NOTIFY_EVERY_S
        self._nonce = os.urandom(8).hex()
        self._keys = itertools.count()

    # -- connection ----------------------------------------------------------------------
    def connection(self) -> Any:
        """The open connection (autocommit), made on first use."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg2.connect(self.dsn, application_name=self.application_name)
            self._conn.autocommit = True
            with self._conn.cursor() as cur:
                for statement in _PREPARE:
                    cur.execute(statement)
        return self._conn

    def cursor(self) -> Any:
        """The connection's one cursor, kept: making one per call costs the appends."""
        if self._cursor is None or self._cursor.closed:  # closed too with its connection
            self._cursor = self.connection().cursor()
        return self._cursor

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            self._cursor = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retrying(self, fn: Callable[[Any], T]) -> T:
        """Run fn(cursor); on a lost connection reconnect (the DSN finds the primary)
        and run it again, until the deadline."""
        deadline = None  # counted from the first failure: the common case reads no clock
        delay = 0.05
        while True:
            try:
                return fn(self.cursor())
            except _DISCONNECTED as exc:
                if isinstance(exc, psycopg2.errors.QueryCanceled):
                    raise _timed_out(exc) from exc
                self.close()
                now = time.monotonic()
                deadline = deadline or now + self.retry_deadline
                if now + delay > deadline:
                    raise LedgerUnavailable(
                        f"no writable ledger primary within {self.retry_deadline:.0f}s: "
                        f"{str(exc).strip() or type(exc).__name__}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    # -- appending -----------------------------------------------------------------------
    def append(self, stream: str, events: Sequence[NewEvent], expected_version: int | None = ANY,
               idempotency_key: str | None = None) -> AppendResult:
        """Append events to one stream in one transaction.

        expected_version: ANY (None), NO_STREAM (0), or the exact current version; a
        mismatch raises VersionConflict carrying the actual version. Sending the same
        idempotency_key again returns the first result and writes nothing.
        """
        # Generated keys are time-ordered so they land at the index's right edge (a random
        # key costs PostgreSQL twice the index work per append), and unique by this
        # object's random nonce and counter (no syscall per append, unlike uuid4).
        key = idempotency_key or f"{time.time_ns():016x}{self._nonce}{next(self._keys):x}"
        # The common case (one plainly valid event, a connection already open) takes as
        # few Python steps as possible: with 16 writers on 2 cores, Python that runs right
        # after a blocking round trip runs with cold caches, and the general path's extra
        # steps cost 5-10% of the appends/s (noisy; bench/ledger.py). Anything unusual,
        # including every error, goes the general way, which sends the same statement
        # again (safe: the key) and says what went wrong.
        args = _plain_one(stream, events, key, expected_version)
        cur = self._cursor
        if args is not None and cur is not None and not cur.closed:
            try:
                cur.execute(_EXEC_ONE, args)
                row = cur.fetchone()
            except psycopg2.errors.QueryCanceled as exc:
                raise _timed_out(exc) from exc
            except psycopg2.Error:
                row = None
            if row is not None:
                if self._conn.notices:  # perhaps a replication wait ended early
                    self._confirm_if_cut(key)
                return self._woken(AppendResult(stream, (row[0],), (row[1],), False, (row[2],)))
        return self._woken(self._append_checked(stream, events, key, expected_version))

    def new_key(self) -> str:
        """A fresh idempotency key of this writer's (as `append` makes them, inline there)."""
        return f"{time.time_ns():016x}{self._nonce}{next(self._keys):x}"

    def _append_checked(self, stream: str, events: Sequence[NewEvent], key: str,
                        expected_version: int | None) -> AppendResult:
        """The general append: every check with its message, batches, retries after a
        lost connection, duplicates, conflicts."""
        category = stream_category(stream)
        if not events:
            raise InvalidEvent("nothing to append", {"_events": ["empty"]})
        if len(events) > MAX_BATCH:
            raise InvalidEvent(f"at most {MAX_BATCH} events per append",
                               {"_events": [f"more than {MAX_BATCH}"]})
        if expected_version is not None and expected_version < 0:
            raise InvalidEvent("expected_version must be ANY, NO_STREAM (0) or a version",
                               {"expected_version": ["must be >= 0"]})
        if len(events) == 1:
            sql = _EXEC_ONE
            args: tuple = (stream, category, *_encoded(category, events[0]), key,
                           expected_version)
        else:
            types, datas, metas = zip(*[_encoded(category, ev) for ev in events], strict=True)
            sql = _EXEC_MANY
            args = (stream, category, list(types), list(datas), list(metas), key,
                    expected_version)
        result = self._retrying(lambda cur: self._append_once(cur, stream, sql, args))
        if result.duplicate:
            self._confirm(key)
        elif self._conn.notices:
            self._confirm_if_cut(key)
        return result

    # -- acknowledging only what is durable (see the module doc) ---------------------------
    def _confirm_if_cut(self, key: str) -> None:
        """Confirm the append if a notice says its wait for the standby was cut short."""
        notices = self._conn.notices
        cut = any(SYNC_WAIT_CUT in notice for notice in notices)
        notices.clear()
        if cut:
            self._confirm(key)

    def _confirm(self, key: str) -> None:
        """Return once every commit visible now is durable on the synchronous standby
        (always, with none named); OutcomeUnknown after confirm_timeout."""
        deadline = time.monotonic() + self.confirm_timeout
        try:
            cur = self.cursor()
            cur.execute("SELECT pg_current_wal_flush_lsn()")
            (lsn,) = cur.fetchone()
            while True:
                cur.execute("SELECT ledger.durable_lsn() >= %s::pg_lsn", (lsn,))
                if cur.fetchone()[0]:
                    return
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        except psycopg2.Error as exc:
            self.close()
            raise OutcomeUnknown(f"append {key!r} committed on the primary, not confirmed on "
                                 f"the standby ({str(exc).strip()}): retry it", key) from exc
        raise OutcomeUnknown(f"append {key!r} committed on the primary, not on the synchronous "
                             f"standby within {self.confirm_timeout:.0f}s: retry it", key)

    def _woken(self, result: AppendResult) -> AppendResult:
        """NOTIFY for a new append unless this writer did so less than NOTIFY_EVERY_S ago
        (see the module doc)."""
        if self.notify and not result.duplicate:
            now = time.monotonic()
            if now - self._last_notify >= NOTIFY_EVERY_S:
                self._last_notify = now
                self._wake()
        return result

    def _append_once(self, cur: Any, stream: str, sql: str, args: tuple) -> AppendResult:
        key, expected = args[5], args[6]
        for _ in range(100):  # ANY loses a race only to a concurrent append: try again
            try:
                cur.execute(sql, args)
                rows = cur.fetchall()
            except psycopg2.errors.UniqueViolation as exc:
                if exc.diag.constraint_name == "events_idempotency_key":
                    return self._original(cur, stream, sql, args)
                if expected is None:
                    continue
                rows = []
            if rows:
                return _result(stream, rows)
            if self._lookup_key(cur, key):
                return self._original(cur, stream, sql, args)
            raise VersionConflict(stream, expected, self._version(cur, stream))
        raise LedgerUnavailable(f"stream {stream!r} too contended to append")

    def _lookup_key(self, cur: Any, key: str) -> tuple[Any, str] | None:
        cur.execute("SELECT tx_id, stream FROM ledger.events WHERE idempotency_key = %s", (key,))
        return cur.fetchone()

    def _original(self, cur: Any, stream: str, sql: str, args: tuple) -> AppendResult:
        key = args[5]
        found = self._lookup_key(cur, key)
        if found is None:  # the row that collided rolled back meanwhile: try afresh
            return self._append_once(cur, stream, sql, args)
        tx_id, used_for = found
        if used_for != stream:
            raise IdempotencyConflict(
                f"idempotency key {key!r} was used for stream {used_for!r}")
        cur.execute("SELECT id, version, recorded_at FROM ledger.events "
                    "WHERE tx_id = %s AND stream = %s ORDER BY id", (tx_id, stream))
        return _result(stream, cur.fetchall(), duplicate=True)

    def _version(self, cur: Any, stream: str) -> int:
        cur.execute("EXECUTE tally_stream_version(%s)", (stream,))
        return cur.fetchone()[0]

    def _wake(self) -> None:
        """NOTIFY after commit, in its own WAL-free transaction (see module doc)."""
        try:
            with self.connection().cursor() as cur:
                cur.execute(f"NOTIFY {CHANNEL}")
        except psycopg2.Error:
            self.close()  # the poll timer of relays and readers covers a lost wake-up

    # -- sequencing ----------------------------------------------------------------------
    def sequence(self, limit: int = 10_000) -> int:
        """Give positions to every committed event that can no longer be preceded by a
        late commit (SQL function ledger.sequence, see migration 0001). Returns the head.

        Who sequences, and when. Readers see only sequenced events, so a reader that must
        not wait for a relay sequences before it reads; everyone else reads the head as
        it is. The callers, each for that reason:
        - the relays: the leader on every NOTIFY and while hot, both on their poll timer
          (ledger/relay.py); this is what moves the head in normal operation;
        - the projectors daemon and `tally projectors rebuild`, before each catch-up, so
          views never depend on a relay being up;
        - the placer, before each round, for the same reason;
        - the API, where a request must see what was just appended: long-polls of
          `/events` on waking, `/apps/NAME/why`, and its Directory of users when a token
          is unknown (a user created a moment ago).
        Safe from many processes at once (an advisory lock serialises batches; writers
        never take it); needs the writer role. Tests and benchmarks call it to make what
        they appended visible without a relay."""
        def run(cur: Any) -> int:
            while True:
                cur.execute("EXECUTE tally_sequence(%s)", (limit,))
                placed, head = cur.fetchone()
                if placed < limit:
                    return head
        return self._retrying(run)

    # -- reading -------------------------------------------------------------------------
    def head(self) -> int:
        """The highest position readers can see: everything at or below it is final."""
        return self._retrying(head_of)

    def read_all(self, after: int = 0, *, limit: int | None = 1000, upto: int | None = None,
                 categories: Iterable[str] | None = None, types: Iterable[str] | None = None,
                 streams: Iterable[str] | None = None, since: datetime | None = None,
                 newest: bool = False) -> list[RecordedEvent]:
        """Sequenced events with after < position <= upto, in ledger order, filtered by
        stream, category, type and recording time; at most `limit` (the oldest, or with
        `newest` the newest). See ledger.reads.Range."""
        try:
            r = reads.Range(after, upto, streams, categories, types, since, limit, newest)
        except ValueError as exc:
            raise InvalidEvent(str(exc), {"after": [str(exc)]}) from None
        return self._retrying(lambda cur: reads.read(cur, r))

    def read_batch(self, after: int, upto: int) -> list[RecordedEvent]:
        """Every event with after < position <= upto, metadata undecoded: the projectors'
        catch-up (ledger.reads.read_batch)."""
        return self._retrying(lambda cur: reads.read_batch(cur, after, upto))

    def last_of(self, stream: str) -> RecordedEvent | None:
        """A stream's newest sequenced event."""
        return self._retrying(lambda cur: reads.last_of(cur, stream))

    def read_stream(self, stream: str, from_version: int = 1,
                    limit: int | None = None) -> list[RecordedEvent]:
        """One stream's events from `from_version`, in version order."""
        stream_category(stream)

        def run(cur: Any) -> list[RecordedEvent]:
            cur.execute("EXECUTE tally_read_stream(%s, %s, %s)", (stream, from_version, limit))
            return [recorded(row) for row in cur.fetchall()]
        return self._retrying(run)

    def read_streams(self, streams: Sequence[str], types: Sequence[str]) -> list[RecordedEvent]:
        """Every event of these types in these streams, sequenced or not (ledger.reads.
        of_streams): one query for many short streams, e.g. the users behind a batch."""
        for stream in streams:
            stream_category(stream)
        return self._retrying(lambda cur: reads.of_streams(cur, list(streams), list(types)))

    def last_per_stream(self, category: str, after: int,
                        upto: int) -> list[tuple[int, str, datetime]]:
        """(position, stream, recorded_at) of each stream's newest event of `category` in
        after < position <= upto (ledger.reads.last_per_stream)."""
        return self._retrying(lambda cur: reads.last_per_stream(cur, category, after, upto))

    def desired_moves(self, after: int, upto: int,
                      types: list[str]) -> list[tuple[str | None, str | None, int]]:
        """(host_id, app, last position) of the events of `types` in after < position <=
        upto (ledger.reads.desired_moves)."""
        return self._retrying(lambda cur: reads.desired_moves(cur, after, upto, types))

    def stream_version(self, stream: str) -> int:
        """The stream's current version (0: no such stream)."""
        stream_category(stream)
        return self._retrying(lambda cur: self._version(cur, stream))

    def positions_of(self, event_ids: Sequence[int]) -> dict[int, int]:
        """Positions already given to these events (absent: not sequenced yet)."""
        def run(cur: Any) -> dict[int, int]:
            cur.execute("SELECT event_id, position FROM ledger.positions "
                        "WHERE event_id = ANY(%s)", (list(event_ids),))
            return dict(cur.fetchall())
        return self._retrying(run)


def _result(stream: str, rows: list[tuple], duplicate: bool = False) -> AppendResult:
    ids, versions, recorded_at = zip(*rows, strict=True)
    return AppendResult(stream, ids, versions, duplicate, recorded_at)

