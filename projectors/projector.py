"""What a projector is: a name, its view tables, and a handler per event type.

Applying events is pure (projectors/tables.py); where the rows go is the shell's business.
A handler that raises stops its projector at that event (HandlerFailed carries the event):
never a silent skip.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ledger.events import RecordedEvent
from projectors.tables import Tables

Handler = Callable[[Tables, RecordedEvent], None]
Finish = Callable[[Tables], None]


class HandlerFailed(Exception):
    """A handler raised on one event. `applied` events before it went through."""

    def __init__(self, projector: str, event: RecordedEvent, error: BaseException,
                 applied: int) -> None:
        self.projector, self.event, self.error, self.applied = projector, event, error, applied
        super().__init__(f"projector {projector} failed on {event.type} at position "
                         f"{event.position}: {type(error).__name__}: {error}")


@dataclass(frozen=True)
class Projector:
    """`tables` maps each table it owns to its primary key columns; the first
    `public` ones are views others read, the rest its private memory."""

    name: str
    tables: Mapping[str, tuple[str, ...]]
    handlers: Mapping[str, Handler]
    public: tuple[str, ...]
    indexes: Mapping[str, str] = field(default_factory=dict)
    finish: Finish | None = None
    """Called after each batch (e.g. routes recomputes the apps its handlers marked)."""

    def new_tables(self) -> Tables:
        return Tables(self.tables, self.indexes)

    def apply(self, tables: Tables, events: Sequence[RecordedEvent]) -> None:
        """Apply events in order. Raises HandlerFailed naming the event that failed; the
        tables then hold a partial batch and must be discarded."""
        handlers = self.handlers
        for i, event in enumerate(events):
            handler = handlers.get(event.type)
            if handler is None:
                continue
            try:
                handler(tables, event)
            except Exception as exc:
                raise HandlerFailed(self.name, event, exc, i) from exc
        if self.finish is not None:
            self.finish(tables)


def project(projectors: Sequence[Projector], events: Sequence[RecordedEvent]
            ) -> dict[str, Tables]:
    """Project events from scratch in memory: what `why` and the unit tests use."""
    out = {p.name: p.new_tables() for p in projectors}
    for p in projectors:
        p.apply(out[p.name], events)
    return out


def table_owners(projectors: Sequence[Projector]) -> dict[str, Projector]:
    """Public view name -> the projector that writes it."""
    return {t: p for p in projectors for t in p.public}


def handles(*types: str) -> Callable[[Handler], Handler]:
    """Mark a handler with the event types it handles (collected by `handlers_of`)."""
    def mark(fn: Handler) -> Handler:
        fn.handles = types  # type: ignore[attr-defined]
        return fn
    return mark


def handlers_of(*fns: Handler) -> dict[str, Handler]:
    return {t: fn for fn in fns for t in fn.handles}  # type: ignore[attr-defined]
