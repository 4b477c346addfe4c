"""The endpoints of balancers, with a balancer token bound to their host: the routing table
(the routes view) they read, and the router samples they send. With them a balancer holds
no ledger credentials (DESIGN.md, "Trust boundaries"); its token opens nothing else."""

from __future__ import annotations

import time

from flask.typing import ResponseReturnValue

from api import schemas
from api.auth import require_host
from api.web import body, query, reply, route, services, who

WAIT_S = 1.0
"""Longest wait for the routes projector to reach the position a balancer was woken for."""
POLL_S = 0.002
"""How often that wait looks while this process does not hear the projectors' commits."""
UNHEARD_S = 0.05
"""... and while it does (a commit wakes it: projectors/views.py, Projected)."""


@route("/balancers/<balancer_id>/routing", query=schemas.RoutingQuery,
       response=schemas.Routing, tag="balancers", errors=(400, 401, 403, 422))
def routing(balancer_id: str) -> ResponseReturnValue:
    """The routing table past routes_version `after`, once the routes projector has applied
    ledger position `position` (a relay's wake-up; a second at most), so a change is sent
    as soon as it is projected: the wait is woken by the projectors' commits (NOTIFY), or
    polls every 2 ms while this process does not hear them. No routes when the version has
    not moved."""
    require_host(who(), balancer_id, role="balancer")
    q = query(schemas.RoutingQuery)
    views, projected = services().views, services().projected
    deadline = time.monotonic() + WAIT_S
    seen = projected.seen()
    checkpoint, version = views.routes_status()
    while checkpoint < q["position"]:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        projected.wait(seen, min(left, UNHEARD_S if projected.listening else POLL_S))
        seen = projected.seen()
        checkpoint, version = views.routes_status()
    if version == q["after"]:
        return reply(schemas.Routing, {"version": version, "checkpoint": checkpoint,
                                       "changed": False, "routes": []})
    routes, version = views.routing()
    return reply(schemas.Routing, {"version": version, "checkpoint": checkpoint,
                                   "changed": True, "routes": routes})


@route("/balancers/<balancer_id>/stats", "POST", body=schemas.RouterSamples,
       response=schemas.Written, tag="balancers", errors=(400, 401, 403, 422))
def router_stats(balancer_id: str) -> ResponseReturnValue:
    """A balancer's router samples (per app: requests by status class, held, retries,
    latency buckets), one row each beside the agents' samples: `tally stats` shows them."""
    require_host(who(), balancer_id, role="balancer")
    samples = body(schemas.RouterSamples)["samples"]
    services().stats.write_router(balancer_id, samples)
    return reply(schemas.Written, {"written": len(samples)})
