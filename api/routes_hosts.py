"""Endpoints the host agents talk to with host-scoped tokens: registering their host,
heartbeats, their placements (desired state), their instances' events; and the fleet's
hosts as admins list them."""

from __future__ import annotations

from typing import Any

from flask.typing import ResponseReturnValue

from api import schemas
from api.auth import require_host, require_role
from api.errors import Conflict, Forbidden, Unprocessable
from api.web import body, reply, route, services, who
from ledger import NO_STREAM, NewEvent, VersionConflict


@route("/hosts", response=schemas.Rows, tag="fleet", errors=(401, 403))
def list_hosts() -> ResponseReturnValue:
    """The fleet, from the hosts view (admins only)."""
    require_role(who(), "admin")
    return reply(schemas.Rows, {"items": services().hosts()})


@route("/hosts/<host_id>", "PUT", body=schemas.HostRegister, response=schemas.Appended,
       tag="agents", errors=(400, 401, 403, 409, 422))
def register_host(host_id: str) -> ResponseReturnValue:
    """An agent registers its host: address, port range, capacity (and its run endpoint,
    memory). A re-registration keeps what it does not name; the first must name the
    address, port range and capacity."""
    require_host(who(), host_id)
    stream = f"host-{host_id}"
    history = services().ledger.read_stream(stream)
    before = next((e.data for e in reversed(history) if e.type == "HostRegistered"), {})
    data = {**before, **body(schemas.HostRegister), "host_id": host_id}
    missing = [f for f in ("address", "port_min", "port_max", "capacity") if f not in data]
    if missing:
        raise Unprocessable(f"a host's first registration names {', '.join(missing)}",
                            {f: ["required"] for f in missing})
    if data["port_min"] > data["port_max"]:
        raise Unprocessable("port_min must not exceed port_max", {"port_min": ["> port_max"]})
    try:
        result = services().append(stream, [NewEvent("HostRegistered", data)],
                                   len(history) or NO_STREAM, who())
    except VersionConflict as exc:
        raise Conflict(f"host {host_id} changed meanwhile: register again") from exc
    return reply(schemas.Appended, {"stream": stream, "version": result.version})


@route("/hosts/<host_id>/heartbeats", "POST", body=schemas.Heartbeat,
       response=schemas.Appended, tag="agents", errors=(400, 401, 403, 422))
def heartbeat(host_id: str) -> ResponseReturnValue:
    """An agent says its host is alive."""
    require_host(who(), host_id)
    return _append(f"heartbeat-{host_id}", "HostHeartbeat",
                   {"host_id": host_id, **body(schemas.Heartbeat)})


@route("/hosts/<host_id>/placements", response=schemas.Rows, tag="agents",
       errors=(401, 403))
def host_placements(host_id: str) -> ResponseReturnValue:
    """What the placer wants on this host (the agent's desired state)."""
    require_host(who(), host_id)
    return reply(schemas.Rows, {"items": services().views.placements(host_id=host_id)})


@route("/instances/<instance_id>/events", "POST", body=schemas.InstanceEvent,
       response=schemas.Appended, tag="agents", errors=(400, 401, 403, 422))
def instance_event(instance_id: str) -> ResponseReturnValue:
    """An agent reports what one of its instances did (started, healthy, exited, stopped):
    only instances placed on its host, or still running there."""
    caller = who()
    req = body(schemas.InstanceEvent)
    data = {**req["data"], "instance_id": instance_id}
    if caller.role == "agent":
        if not caller.host_id or not services().views.on_host(instance_id, caller.host_id):
            raise Forbidden(f"instance {instance_id} is not placed on host {caller.host_id}")
        data["host_id"] = caller.host_id
    else:
        require_role(caller, "admin")
    return _append(f"instance-{instance_id}", req["type"], data)


def _append(stream: str, type_: str, data: dict[str, Any]) -> ResponseReturnValue:
    result = services().append(stream, [NewEvent(type_, data)], None, who())
    return reply(schemas.Appended, {"stream": stream, "version": result.version})
