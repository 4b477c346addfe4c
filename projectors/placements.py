"""The placements view: desired state, as the placer decided it. An instance is placed
(InstancePlaced) until the placer withdraws it (InstanceUnplaced)."""

from __future__ import annotations

from ledger.events import RecordedEvent
from projectors.projector import Projector, handlers_of, handles
from projectors.tables import Tables


@handles("InstancePlaced")
def placed(t: Tables, e: RecordedEvent) -> None:
    d = e.data
    t.put("placements", {
        "instance_id": d["instance_id"], "app": d["app"], "release": d["release"],
        "process_type": d["process_type"], "host_id": d["host_id"], "port": d["port"],
        "placed_at": e.recorded_at, "position": e.position,
    })


@handles("InstanceUnplaced")
def unplaced(t: Tables, e: RecordedEvent) -> None:
    t.delete("placements", e.data["instance_id"])


PROJECTOR = Projector(
    name="placements",
    tables={"placements": ("instance_id",)},
    public=("placements",),
    handlers=handlers_of(placed, unplaced),
)
