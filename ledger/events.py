"""Events as immutable values: what callers append, and what readers get back."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

ANY: int | None = None
"""expected_version: append whatever the stream's version is."""
NO_STREAM = 0
"""expected_version: the stream must not exist yet."""

MAX_DATA_BYTES = 64 * 1024
"""Largest event payload (serialised JSON). Bundles, logs and backups live elsewhere."""
MAX_METADATA_BYTES = 4 * 1024
MAX_BATCH = 1000


@dataclass(frozen=True)
class NewEvent:
    """An event to append: its catalogue type, payload, and optional metadata
    (actor, causation_id, correlation_id)."""

    type: str
    data: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordedEvent:
    """An event as stored. `position` is its place in the one total order of the ledger
    (None until the sequencer has placed it); `version` its place in its stream."""

    position: int | None
    id: int
    stream: str
    version: int
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "position": self.position, "id": self.id, "stream": self.stream,
            "version": self.version, "type": self.type, "data": self.data,
            "metadata": self.metadata, "recorded_at": self.recorded_at.isoformat(),
        }


@dataclass(frozen=True)
class AppendResult:
    """Where an append landed. `duplicate` is True when an idempotency key had already
    been used and nothing new was written. `recorded_at`: the ledger's clock per event."""

    stream: str
    event_ids: tuple[int, ...]
    versions: tuple[int, ...]
    duplicate: bool = False
    recorded_at: tuple[datetime, ...] = ()

    @property
    def version(self) -> int:
        """The stream's version after this append."""
        return self.versions[-1] if self.versions else 0
