"""A projector's rows in memory, keyed by primary key, remembering what changed.

Handlers are plain functions over a `Tables` and one event: no SQL, no I/O, so the same
code projects live into `views`, into a rebuild schema, into a scratch schema for
`tally state --at N`, and into nothing at all for `tally why` and the unit tests. The
shell (projectors/store.py) loads the rows once and, per batch, writes only the rows that
changed, with the checkpoint, in one transaction. Heartbeats of one host within a batch
thus become one UPDATE.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

Row = dict[str, Any]
Key = tuple[Any, ...]


class Tables:
    """Rows of several tables. `keys` names each table's primary key columns; `indexes`
    optionally names one column per table to look rows up by (`by`)."""

    def __init__(self, keys: Mapping[str, tuple[str, ...]],
                 indexes: Mapping[str, str] | None = None) -> None:
        self.keys = dict(keys)
        self.indexes = dict(indexes or {})
        self._key_of = {t: _key_getter(cols) for t, cols in self.keys.items()}
        self.rows: dict[str, dict[Key, Row]] = {t: {} for t in self.keys}
        self.changes: dict[str, dict[Key, Row | None]] = {t: {} for t in self.keys}
        self._index: dict[str, dict[Any, set[Key]]] = {t: {} for t in self.indexes}
        self.marks: dict[str, int] = {}
        """Things a projector wants to revisit at the end of a batch, with a position."""

    def key_of(self, table: str, row: Row) -> Key:
        return self._key_of[table](row)

    def get(self, table: str, *key: Any) -> Row | None:
        return self.rows[table].get(key)

    def all(self, table: str) -> Iterator[Row]:
        return iter(self.rows[table].values())

    def by(self, table: str, value: Any) -> list[Row]:
        """Rows whose indexed column equals value."""
        rows = self.rows[table]
        return [rows[k] for k in self._index[table].get(value, ())]

    def put(self, table: str, row: Row) -> None:
        """Insert or replace a whole row. Rows are values: put a new dict, never mutate
        one you got."""
        key = self._key_of[table](row)
        rows = self.rows[table]
        column = self.indexes.get(table)
        if column is not None:
            old = rows.get(key)
            if old is not None:
                self._unindex(table, key, old)
            self._index[table].setdefault(row[column], set()).add(key)
        rows[key] = row
        self.changes[table][key] = row

    def update(self, table: str, row: Row, **changes: Any) -> Row:
        """Put a copy of `row` with `changes`; returns the new row."""
        new = {**row, **changes}
        self.put(table, new)
        return new

    def delete(self, table: str, *key: Any) -> None:
        old = self.rows[table].pop(key, None)
        if old is None:
            return
        self._unindex(table, key, old)
        self.changes[table][key] = None

    def _unindex(self, table: str, key: Key, row: Row) -> None:
        column = self.indexes.get(table)
        if column is not None:
            keys = self._index[table].get(row[column])
            if keys:
                keys.discard(key)

    def load(self, table: str, rows: Iterable[Row]) -> None:
        """Fill a table from storage without marking anything changed."""
        for row in rows:
            self.put(table, row)
        self.changes[table].clear()

    def take_changes(self) -> dict[str, dict[Key, Row | None]]:
        """What changed since the last call: per table, key -> new row, or None if deleted."""
        out = {t: c for t, c in self.changes.items() if c}
        self.changes = {t: {} for t in self.keys}
        return out

    def snapshot(self) -> dict[str, list[Row]]:
        """Every row of every table, sorted by key: for printing and comparing."""
        return {t: [rows[k] for k in sorted(rows, key=_sortable)] for t, rows in self.rows.items()}


def _key_getter(columns: tuple[str, ...]) -> Callable[[Row], Key]:
    if len(columns) == 1:
        (column,) = columns
        return lambda row: (row[column],)
    return lambda row: tuple(row[c] for c in columns)


def _sortable(key: Key) -> tuple[tuple[bool, str, Any], ...]:
    return tuple((v is None, str(type(v)), v if v is not None else 0) for v in key)
