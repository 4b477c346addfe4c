"""The hosts view: the fleet as it reports itself.

The view stores facts only: `alive` (registered, or heard from since it was lost) or `lost`
(HostLost). Whether a host is *suspect* depends on the clock, so it is derived when read,
with the reader's `now` and the placer's timings: `host_state(row, now, liveness)`, the one
rule of `ledger.vocabulary`. `tally state --at N` thus shows what was known at N, and the
same row reads differently a minute later, as it should.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ledger.events import RecordedEvent
from ledger.rules import HOST_LOST_AFTER
from ledger.vocabulary import HostState, Liveness
from ledger.vocabulary import host_state as _rule
from projectors.projector import Projector, handlers_of, handles
from projectors.tables import Tables


def host_state(row: dict[str, Any], now: datetime, liveness: Liveness) -> HostState:
    """A row of the hosts view, judged as of `now` (ledger.vocabulary.host_state)."""
    return _rule(row["state"] == HostState.LOST,
                 row.get("last_heartbeat") or row.get("registered_at"), now, liveness)


@handles("HostRegistered")
def host_registered(t: Tables, e: RecordedEvent) -> None:
    d = e.data
    old = t.get("hosts", d["host_id"]) or {}
    t.put("hosts", {
        "host_id": d["host_id"], "address": d["address"], "port_min": d["port_min"],
        "port_max": d["port_max"], "capacity": d["capacity"], "memory_mb": d.get("memory_mb", 0),
        "state": _state_after(e), "registered_at": e.recorded_at, "registered_position": e.position,
        "last_heartbeat": old.get("last_heartbeat"),
        "heartbeat_position": old.get("heartbeat_position"), "load": old.get("load"),
        "memory_used_mb": old.get("memory_used_mb"),
        "running_instances": old.get("running_instances"), "lost_position": None,
        "lost_reason": None, "position": e.position,
    })


@handles("HostHeartbeat")
def heartbeat(t: Tables, e: RecordedEvent) -> None:
    host = t.get("hosts", e.data["host_id"])
    if host is None:
        return
    t.update("hosts", host, state=_state_after(e), last_heartbeat=e.recorded_at,
             heartbeat_position=e.position, load=e.data.get("load"),
             memory_used_mb=e.data.get("memory_used_mb"),
             running_instances=e.data.get("instances"), position=e.position)


@handles("HostLost")
def host_lost(t: Tables, e: RecordedEvent) -> None:
    host = t.get("hosts", e.data["host_id"])
    if host is not None:
        t.update("hosts", host, state=_state_after(e), lost_position=e.position,
                 lost_reason=e.data.get("reason", ""), position=e.position)


def _state_after(e: RecordedEvent) -> HostState:
    return HostState.LOST if HOST_LOST_AFTER[e.type] else HostState.ALIVE


PROJECTOR = Projector(
    name="hosts",
    tables={"hosts": ("host_id",)},
    public=("hosts",),
    handlers=handlers_of(host_registered, heartbeat, host_lost),
)
