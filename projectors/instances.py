"""The instances view: what host agents observe, joined with what the placer asked for.

States: placed (desired, not started yet) -> started -> healthy; exited (crashed: exit code,
signal, restarts, last log lines, and the host's reason: R15 when killed for its memory);
stopped (on purpose). A row leaves once the instance is both unplaced and not running, so
the view holds what is, or should be, on the fleet.
"""

from __future__ import annotations

from typing import Any

from ledger.events import RecordedEvent
from ledger.rules import OBSERVED, instance_kept
from ledger.vocabulary import InstanceState
from projectors.projector import Projector, handlers_of, handles
from projectors.tables import Tables


@handles("InstancePlaced")
def placed(t: Tables, e: RecordedEvent) -> None:
    d = e.data
    old = t.get("instances", d["instance_id"])
    desired = {"app": d["app"], "release": d["release"], "process_type": d["process_type"],
               "host_id": d["host_id"], "port": d["port"], "placed": True,
               "placed_position": e.position, "position": e.position}
    if old is not None:
        t.update("instances", old, **desired)
        return
    t.put("instances", {
        "instance_id": d["instance_id"], **desired, "state": InstanceState.PLACED, "pid": None,
        "since": e.recorded_at, "exit_code": None, "signal": None, "restarts": 0,
        "log_tail": [], "state_position": e.position, "reason": "",
    })


@handles("InstanceUnplaced")
def unplaced(t: Tables, e: RecordedEvent) -> None:
    row = t.get("instances", e.data["instance_id"])
    if row is None:
        return
    if not instance_kept(False, row["state"]):
        t.delete("instances", row["instance_id"])
    else:
        t.update("instances", row, placed=False, position=e.position)


@handles("InstanceStarted")
def started(t: Tables, e: RecordedEvent) -> None:
    # exit_code and signal stay: they are the last termination (as Kubernetes' Last State),
    # what `tally ps` and `why` show for an instance that keeps restarting.
    _observe(t, e, pid=e.data["pid"])


@handles("InstanceHealthy")
def healthy(t: Tables, e: RecordedEvent) -> None:
    _observe(t, e)


@handles("InstanceExited")
def exited(t: Tables, e: RecordedEvent) -> None:
    d = e.data
    _observe(t, e, exit_code=d.get("exit_code"), signal=d.get("signal"),
             restarts=d.get("restarts", 0), log_tail=d.get("log_tail", []),
             reason=d.get("reason", ""))


@handles("InstanceStopped")
def stopped(t: Tables, e: RecordedEvent) -> None:
    _observe(t, e)


def _observe(t: Tables, e: RecordedEvent, **facts: Any) -> None:
    state, instance_id = OBSERVED[e.type], e.data["instance_id"]
    row = t.get("instances", instance_id)
    if row is None:  # an agent reports an instance the placer no longer wants
        row = {"instance_id": instance_id, "app": None, "release": None, "process_type": None,
               "host_id": e.data.get("host_id"), "port": None, "placed": False, "pid": None,
               "exit_code": None, "signal": None, "restarts": 0, "log_tail": [],
               "placed_position": None, "reason": ""}
    if not instance_kept(row["placed"], state):
        t.delete("instances", instance_id)
        return
    host = e.data.get("host_id") or row["host_id"]
    t.put("instances", {**row, **facts, "state": state, "since": e.recorded_at,
                        "host_id": host, "state_position": e.position, "position": e.position})


PROJECTOR = Projector(
    name="instances",
    tables={"instances": ("instance_id",)},
    public=("instances",),
    handlers=handlers_of(placed, unplaced, started, healthy, exited, stopped),
)
