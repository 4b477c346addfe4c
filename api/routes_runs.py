"""Endpoints of one-off runs: start one (the API checks who asks, records RunStarted,
chooses the host, signs the agent's ticket), attach to it over a WebSocket (the API relays
the terminal), stop one. Agents act only on tickets, so every run passes here."""

from __future__ import annotations

import time
from dataclasses import dataclass

from flask import request
from flask.typing import ResponseReturnValue

from api import relay, runs, schemas
from api.errors import BadRequest, Conflict, NotFound, Unavailable, Unprocessable
from api.routes_apps import app_state, authorized
from api.routes_builds import build_of
from api.routes_quotas import quota_of
from api.state import AppState, Run
from api.web import body, reply, route, services, who
from ledger import NewEvent, curve
from ledger.tickets import RELAYS_FULL, host_key, sign


def _key() -> bytes:
    key = services().settings.run_key
    if key is None:
        raise Conflict("one-off runs are not enabled on this platform (no TALLY_RUN_KEY)")
    return key


def _ticket(name: str, run: Run, kind: str) -> str:
    """The run's ticket, signed with the key of the host it is for (only that host's agent
    knows it: ledger/tickets.py)."""
    return sign(host_key(_key(), run.host_id),
                runs.ticket(name, run, who().name, kind, time.time()))


@dataclass(frozen=True)
class RunSocket:
    """Where a host's agent takes runs, and how the API speaks to it: CURVE, with the
    public key the host registered and the API's channel keypair."""

    endpoint: str
    keys: curve.Client


def run_socket(host_id: str) -> RunSocket | None:
    """The host's run socket as it last registered it; None if it registered none (or no
    key: an agent of another version)."""
    for e in reversed(services().ledger.read_stream(f"host-{host_id}")):
        if e.type == "HostRegistered":
            endpoint, public = e.data.get("run_endpoint"), e.data.get("public_key")
            if not endpoint or not public:
                return None
            return RunSocket(str(endpoint), curve.Client(str(public).encode(),
                                                         relay.run_channel(_key())))
    return None


def _choose_host(app: str) -> str:
    """The best candidate host that has a run socket ("" if none)."""
    svc = services()
    placed = {p["host_id"] for p in svc.views.placements(app)}
    return next((host for host in runs.candidate_hosts(svc.hosts(), placed)
                 if run_socket(host) is not None), "")


def _socket_of(run: Run) -> RunSocket:
    found = run_socket(run.host_id)
    if found is None:
        raise Conflict(f"host {run.host_id} has no run socket (an agent of another "
                       f"version?)")
    return found


def _run_of(state: AppState, number: int) -> Run:
    found = state.run(number)
    if found is None:
        raise NotFound(f"app {state.name} has no run.{number}")
    return found


def _ended(app: str, run: Run, reason: str) -> None:
    """Record a run's end that its agent cannot: the API lost the agent, or the agent runs
    no such command (the agent records every other end)."""
    services().append(f"app-{app}", [NewEvent("RunEnded", {
        "app": app, "number": run.number, "run_id": run.run_id, "exit_code": None,
        "host_id": run.host_id, "reason": reason[:500]})], None, who())


@route("/apps/<name>/runs", "POST", body=schemas.RunCreate, response=schemas.Run, status=201,
       tag="runs", errors=(400, 401, 403, 404, 409, 422, 503))
def start_run(name: str) -> ResponseReturnValue:
    """Start a one-off command in the app's current release on a host: attached (then
    open its `attach` WebSocket) or detached (output to the app's logs)."""
    req = body(schemas.RunCreate)
    app_state(name)
    _key()
    host = _choose_host(name)
    svc = services()
    state = svc.command(name, who(), lambda s: runs.start(
        authorized(s), req["command"], host, req["detached"],
        lambda r: build_of(s, r).status == "succeeded",
        quota_of("app", name).instances, time.time()))
    run = state.runs[-1]
    if run.detached:
        agent, ticket = _socket_of(run), _ticket(name, run, "run")
        try:
            relay.ask_agent(agent.endpoint, agent.keys, b"run", {"ticket": ticket}, b"started")
        except relay.AgentSilent as exc:
            _ended(name, run, str(exc))
            raise Unavailable(str(exc)) from exc
        except RuntimeError as exc:  # the agent refused or could not start it (recorded)
            raise Unprocessable(str(exc)) from exc
    return reply(schemas.Run, runs.run_dict(name, run), 201)


@route("/apps/<name>/runs/<int:number>", response=schemas.Run, tag="runs",
       errors=(401, 403, 404))
def show_run(name: str, number: int) -> ResponseReturnValue:
    """One run: its command, host, who started it, and how it ended."""
    app_state(name)
    state = services().load_app(name)
    return reply(schemas.Run, runs.run_dict(name, _run_of(state, number)))


@route("/apps/<name>/runs/<int:number>/attach", tag="runs", websocket=True,
       errors=(400, 401, 403, 404, 409, 503))
def attach_run(name: str, number: int) -> ResponseReturnValue:
    """The run's terminal, as a WebSocket (`Upgrade: websocket`): binary messages are
    bytes of stdin and output; text messages JSON control (alive, eof, resize, signal;
    exit, error). Only who started the run attaches, once."""
    app_state(name)
    state = services().load_app(name)
    run = _run_of(state, number)
    runs.attachable(run, who().name, time.time())
    if not relay.is_websocket():
        raise BadRequest("attach with a WebSocket (Connection: Upgrade, Upgrade: websocket)")
    _key()
    agent = _socket_of(run)
    svc = services()
    if not svc.run_relays.acquire(blocking=False):
        _ended(name, run, "never attached: " + RELAYS_FULL)  # never started: not in `ps`
        raise Unavailable(RELAYS_FULL)
    try:
        terminal = {"ticket": _ticket(name, run, "run"), "tty": request.args.get("tty") == "1",
                    "rows": request.args.get("rows", type=int),
                    "cols": request.args.get("cols", type=int)}
        ws = relay.accept()
        relay.relay(ws, agent.endpoint, agent.keys, terminal,
                    lambda why: _ended(name, run, why))
    finally:
        svc.run_relays.release()
    return relay.Hijacked(ws)


@route("/apps/<name>/runs/<int:number>/stop", "POST", response=schemas.Run, tag="runs",
       errors=(401, 403, 404, 409, 503))
def stop_run(name: str, number: int) -> ResponseReturnValue:
    """Stop a run (`tally ps:stop run.N`): SIGTERM, then SIGKILL 10 s later."""
    app_state(name)
    state = services().load_app(name)
    run = _run_of(state, number)
    if run.ended:
        raise Conflict(f"run.{number} has ended already")
    agent = _socket_of(run)
    ticket = _ticket(name, run, "stop")
    try:
        relay.ask_agent(agent.endpoint, agent.keys, b"stop", {"ticket": ticket}, b"stopped",
                        timeout=10)
    except relay.AgentSilent as exc:
        raise Unavailable(str(exc)) from exc
    except RuntimeError as exc:
        if NOT_HERE not in str(exc):
            raise Conflict(f"run.{number} could not be stopped: {exc}") from exc
        _ended(name, run, "stopped: its host runs no such command (never attached, or its "
                          "agent restarted)")
    return reply(schemas.Run, runs.run_dict(name, run))


NOT_HERE = "no such run under way here"
"""What an agent answers a stop of a run it does not run (agents/runs.py)."""

