"""The host agent's pure core: what to do, given what the placer wants on this host and what
runs here. Like Nomad's client `diffAllocs`: removes, restarts, adds; no I/O, clock injected.

An instance's local life: preparing (bundle, virtualenv) -> starting (process up, not yet
answering) -> healthy; exited (crashed: waits out its backoff, then restarts); done (a
release phase that ran to completion: never restarted); stopping (SIGTERM sent, SIGKILL at
the deadline).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from ledger.sizes import DEFAULT_SIZE
from ledger.vocabulary import RELEASE_PHASE, WEB


class State(StrEnum):
    PREPARING = "preparing"
    STARTING = "starting"
    HEALTHY = "healthy"
    EXITED = "exited"
    DONE = "done"
    STOPPING = "stopping"


ALIVE = (State.STARTING, State.HEALTHY, State.STOPPING)
"""States in which a process exists."""
BACKOFF_MAX = 30.0
CHECK_EVERY = 5.0
"""Seconds between health checks of a healthy web instance."""
FAILED_CHECKS = 3
"""Failed checks in a row that make the agent kill a hung instance (it then restarts)."""


@dataclass(frozen=True)
class Want:
    """A placement on this host, with all it takes to run it."""

    instance_id: str
    app: str
    release: int
    process_type: str
    port: int
    digest: str
    command: str
    config: tuple[tuple[str, str], ...] = ()
    size: str = DEFAULT_SIZE
    """Its formation size (ledger/sizes.py): the limits of its cgroup."""


@dataclass
class Local:
    """What the agent knows of one instance it runs (or ran) here."""

    instance_id: str
    state: State
    pid: int | None = None
    restarts: int = 0
    next_start: float = 0.0
    stop_deadline: float = 0.0
    want: Want | None = None
    exit_codes: list[int | None] = field(default_factory=list)
    next_check: float = 0.0
    """When a healthy web instance is checked again."""
    failed_checks: int = 0
    started_at: float = 0.0
    """When the process was started (or adopted): a web instance has a boot timeout."""


class Do(StrEnum):
    """What the agent does to one instance. Preparing ends in a start (the shell starts
    the process once its bundle and virtualenv are ready), so there is no separate start."""

    PREPARE = "prepare"
    CHECK = "check"
    STOP = "stop"
    KILL = "kill"
    FORGET = "forget"


@dataclass(frozen=True)
class Action:
    kind: Do
    instance_id: str
    want: Want | None = None


def backoff(restarts: int) -> float:
    """Seconds to wait before restart number `restarts`: 1, 2, 4 ... capped at 30."""
    return min(2.0 ** max(restarts - 1, 0), BACKOFF_MAX)


def plan(wants: dict[str, Want], local: dict[str, Local], now: float) -> list[Action]:
    """The actions that bring this host towards `wants`: stops first, then starts."""
    out: list[Action] = []
    for iid, loc in sorted(local.items()):
        if iid in wants and loc.want == wants[iid]:
            continue
        if loc.state in (State.STARTING, State.HEALTHY):
            out.append(Action(Do.STOP, iid))
        elif loc.state is State.STOPPING:
            if now >= loc.stop_deadline:
                out.append(Action(Do.KILL, iid))
        elif loc.state is not State.PREPARING:
            out.append(Action(Do.FORGET, iid))
    for iid, want in sorted(wants.items()):
        mine = local.get(iid)
        if mine is None:
            out.append(Action(Do.PREPARE, iid, want))
        elif mine.want != want:
            continue  # stopping the old incarnation first
        elif mine.state is State.STARTING or (
                mine.state is State.HEALTHY and want.process_type == WEB
                and now >= mine.next_check):
            out.append(Action(Do.CHECK, iid, want))
        elif mine.state is State.EXITED and now >= mine.next_start:
            out.append(Action(Do.PREPARE, iid, want))
    return out


def after_check(loc: Local, ok: bool, now: float, every: float = CHECK_EVERY) -> str | None:
    """Record a health check: `healthy` when a starting instance first answers, `kill`
    when a healthy one failed FAILED_CHECKS times in a row, else None."""
    loc.next_check = now + every
    if ok:
        loc.failed_checks = 0
        if loc.state is State.STARTING:
            loc.state = State.HEALTHY
            return "healthy"
        return None
    if loc.state is State.HEALTHY:
        loc.failed_checks += 1
        if loc.failed_checks >= FAILED_CHECKS:
            loc.failed_checks = 0
            return "kill"
    return None


def after_exit(loc: Local, code: int | None, now: float) -> Local:
    """An unasked exit: a release phase is done; anything else restarts after a backoff."""
    loc.pid = None
    loc.exit_codes = (loc.exit_codes + [code])[-10:]
    if loc.want is not None and loc.want.process_type == RELEASE_PHASE:
        loc.state = State.DONE
        return loc
    loc.restarts += 1
    loc.state = State.EXITED
    loc.next_start = now + backoff(loc.restarts)
    return loc
