"""The ledger: one replicated PostgreSQL table of events, and everything needed to use it.

Public surface: `Ledger` (append, read, sequence), the event values, the catalogue, the
errors, the relay and subscriber, and `Cluster` for the local primary + standby.
"""

from ledger.errors import (
    ClusterError,
    IdempotencyConflict,
    InvalidEvent,
    LedgerError,
    LedgerUnavailable,
    OutcomeUnknown,
    VersionConflict,
)
from ledger.events import ANY, NO_STREAM, AppendResult, NewEvent, RecordedEvent
from ledger.store import Ledger

__all__ = [
    "ANY", "NO_STREAM", "AppendResult", "ClusterError", "IdempotencyConflict", "InvalidEvent",
    "Ledger", "LedgerError", "LedgerUnavailable", "NewEvent", "OutcomeUnknown", "RecordedEvent",
    "VersionConflict",
]
