"""One-off runs, the pure part: which host runs a command, the RunStarted that records it,
and the ticket the chosen agent will demand. No I/O here (api/routes_runs.py is the shell).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from api.errors import Conflict, Forbidden, Unprocessable
from api.state import AppState, Release, Run
from ledger.events import NewEvent
from ledger.tickets import TTL_S, Ticket


def serving_release(s: AppState, built: Callable[[Release], bool]) -> int:
    """The release a one-off runs in: the newest built one, as on Heroku, where a release
    exists only once its slug does. Here a release comes before its build (a config change
    makes one that a builder then marks built), and an agent runs only slugs: a newer
    release still building, or whose build failed, has nothing to run yet. `built` reads
    a release's build (newest first, so usually once)."""
    if s.current is None:
        raise Unprocessable(f"app {s.name} has no release to run a command in: deploy first")
    found = next((r for r in reversed(s.releases) if built(r)), None)
    if found is None:
        raise Conflict(f"app {s.name} has no built release to run a command in yet: "
                       f"`tally builds -a {s.name}` says how v{s.current.number}'s goes")
    return found.number


def candidate_hosts(hosts: Iterable[dict[str, Any]], placed: set[str]) -> list[str]:
    """Hosts that may run a command, best first: alive ones already running the app (they
    have its release), then alive ones with a free slot, least loaded first."""
    alive = [h for h in hosts if h["state"] == "alive"]
    running = [h for h in alive if h["host_id"] in placed]
    room = [h for h in alive if h["host_id"] not in placed
            and (h.get("running_instances") or 0) < h["capacity"]]

    def by_load(h: dict[str, Any]) -> tuple[float, str]:
        return (h.get("load") or 0.0, h["host_id"])
    return [h["host_id"] for h in sorted(running, key=by_load) + sorted(room, key=by_load)]


def going(s: AppState, now: float) -> int:
    """Runs that hold one of the app's run slots: detached ones until they end, attached
    ones until they end or can no longer be attached (one never attached is never started,
    and nothing ends it; one attached lasts only as long as its caller's connection)."""
    return sum(1 for r in s.runs if not r.ended
               and (r.detached or now <= started(r, now) + TTL_S))


def start(s: AppState, command: list[str], host_id: str, detached: bool,
          built: Callable[[Release], bool], limit: int, now: float) -> list[NewEvent]:
    """RunStarted: the next run number of the app, on `host_id`, in the serving release.
    At most `limit` runs at once (the app's instances quota: each run has an instance's
    memory, disk and log allowance of its own, so runs without end would be a way around
    the quota)."""
    if going(s, now) >= limit:
        raise Conflict(f"app {s.name} has {limit} one-off run(s) going, as many as its quota "
                       "allows: wait for one to end or stop one (`tally ps` lists them, "
                       f"`tally ps:stop -a {s.name} run.N` stops one)")
    if not host_id:
        raise Conflict("no alive host agent can run a command now: try again shortly")
    number = max((r.number for r in s.runs), default=0) + 1
    return [NewEvent("RunStarted", {
        "app": s.name, "number": number, "run_id": secrets.token_hex(12),
        "command": command, "host_id": host_id, "release": serving_release(s, built),
        "detached": detached})]


def attachable(run: Run, caller: str, now: float) -> None:
    """Only who started an attached run, while it goes on, may attach to it, and only
    within its tickets' life (its command starts on the first attach, and only then)."""
    if run.detached:
        raise Conflict(f"run.{run.number} is detached: its output is in `tally logs`")
    if run.ended:
        raise Conflict(f"run.{run.number} has ended")
    if run.actor != caller:
        raise Forbidden(f"run.{run.number} was started by someone else: only they attach")
    if now > started(run, now) + TTL_S:
        raise Conflict(f"run.{run.number} can no longer be attached: a run is attached once, "
                       f"within {TTL_S:.0f} s of its start; start another")


def started(run: Run, default: float) -> float:
    """When RunStarted was recorded (the ledger's clock), as a Unix time."""
    if run.started_at is None:
        return default
    return datetime.fromisoformat(run.started_at).timestamp()


def ticket(app: str, run: Run, actor: str, kind: str, now: float) -> Ticket:
    """The agent's ticket for `run`. Every "run" ticket of a run has the run's id as its
    nonce and is issued at the run's start: the agent, which remembers a nonce until its
    ticket expires, starts the run once however many attaches are tried, whenever (a
    ticket signed 30 s later has expired at once). A "stop" ticket is fresh."""
    issued = started(run, now) if kind == "run" else now
    extra = {"nonce": run.run_id} if kind == "run" else {}
    return Ticket(kind=kind, run_id=run.run_id, app=app, number=run.number,
                  release=run.release, argv=run.command, actor=actor, host=run.host_id,
                  issued=issued, expires=issued + TTL_S, detached=run.detached, **extra)


def run_dict(app: str, r: Run) -> dict[str, Any]:
    return {"app": app, "number": r.number, "command": list(r.command),
            "host_id": r.host_id, "release": r.release, "detached": r.detached,
            "actor": r.actor, "started_at": r.started_at, "ended": r.ended,
            "exit_code": r.exit_code,
            "attach": None if r.detached else f"/apps/{app}/runs/{r.number}/attach"}


def under_way(s: AppState) -> list[Run]:
    """Runs not ended, as `tally ps` lists them (run.N)."""
    return [r for r in s.runs if not r.ended]
