"""The ledger's exception tree: one named exception per failure a caller can handle.

LedgerError
 ├── VersionConflict      expected version did not match; carries the actual one
 ├── LedgerUnavailable    no primary reachable within the retry deadline
 │    └── OutcomeUnknown   committed on the primary, not confirmed on the standby: retry
 ├── InvalidEvent         unknown type, bad payload, oversized payload, bad stream id
 ├── IdempotencyConflict  an idempotency key reused for a different stream
 └── ClusterError         local cluster management refused or failed
"""

from __future__ import annotations

from typing import Any


class LedgerError(Exception):
    """Base of every error the ledger raises."""


class VersionConflict(LedgerError):
    """The stream was not at the version the caller expected; nothing was written."""

    def __init__(self, stream: str, expected: int | None, actual: int) -> None:
        self.stream, self.expected, self.actual = stream, expected, actual
        want = "no stream" if expected == 0 else f"version {expected}"
        super().__init__(f"stream {stream!r} is at version {actual}, expected {want}")


class LedgerUnavailable(LedgerError):
    """No writable primary answered in time. Transient: callers may retry later."""


class OutcomeUnknown(LedgerUnavailable):
    """An append may have committed on the primary but could not be confirmed durable on
    the synchronous standby (its replication wait was cancelled or cut, or a retry found
    its idempotency key while the standby lagged or was away). Not acknowledged: send the
    same append again with the same idempotency key; it returns the first result once the
    standby has it. Transient, hence a LedgerUnavailable."""

    def __init__(self, message: str, idempotency_key: str) -> None:
        self.idempotency_key = idempotency_key
        super().__init__(message)


class InvalidEvent(LedgerError):
    """An event was refused before anything was written.

    `fields` maps a field name (or `_type`, `_size`, `_stream`) to messages, like
    marshmallow's errors, so an API can return it as-is.
    """

    def __init__(self, message: str, fields: dict[str, Any] | None = None) -> None:
        self.fields = fields or {}
        super().__init__(message)


class IdempotencyConflict(LedgerError):
    """An idempotency key was sent again for a different stream."""


class ClusterError(LedgerError):
    """Managing the local PostgreSQL cluster failed or was refused as unsafe."""
