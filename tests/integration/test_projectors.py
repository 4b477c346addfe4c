"""The projector runtime on a private cluster: exactly-once under `kill -9`, a failing
handler stopping only its projector, rebuild without an empty window, live following (and
its commits heard by listeners)."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from typing import Any

import psycopg2

import projectors
from bench.synthetic import fill, fleet_history
from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from projectors import apps
from projectors.inspect import status
from projectors.projector import Projector
from projectors.rebuild import rebuild
from projectors.replay import state_at
from projectors.runtime import Runner, catch_up, connect
from projectors.store import read_rows
from projectors.views import Projected
from tests.conftest import RelayProcs, free_ports, tally_env
from tests.waiting import wait_until


def _views(dsn: str) -> dict[str, list[dict[str, Any]]]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SET search_path = views")
        out = {v: read_rows(cur, v, p.tables[v]) for v, p in projectors.VIEWS.items()}
    conn.close()
    return out


def _positions(dsn: str) -> dict[str, int]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT name, position FROM views.projector_checkpoints")
        out = dict(cur.fetchall())
    conn.close()
    return out


def _daemon(c: Cluster, *args: str, relays: str = "") -> subprocess.Popen:
    endpoints = relays or ",".join(f"tcp://127.0.0.1:{p}" for p in free_ports(2))
    return subprocess.Popen(
        [sys.executable, "-m", "tally.cli", "serve", "projectors", *args],
        env=tally_env(c, TALLY_RELAYS=endpoints), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)


def test_kill_9_never_applies_an_event_twice_nor_skips_one(private: Cluster) -> None:
    dsn = private.dsn("tally_owner")
    with Ledger(dsn) as ledger:
        fill(ledger, fleet_history(20_000, prefix="k"))
        head = ledger.sequence()
    rnd = random.Random(head)
    kill_at = sorted(rnd.sample(range(500, head - 500), 4))
    killed_at: list[int] = []
    proc = _daemon(private, "--batch", "300", "--poll-interval", "0.2")
    try:
        for threshold in kill_at:
            wait_until(lambda t=threshold: min(_positions(dsn).values() or [0]) >= t, 120,
                       f"projectors never passed position {threshold}")
            proc.kill()  # SIGKILL: no cleanup, maybe mid-transaction
            proc.wait()
            killed_at.append(min(_positions(dsn).values()))
            proc = _daemon(private, "--batch", "300", "--poll-interval", "0.2")
        wait_until(lambda: set(_positions(dsn).values()) == {head}
                   and len(_positions(dsn)) == len(projectors.ALL), 120,
                   "projectors never caught up after the kills")
    finally:
        proc.kill()
        proc.wait()
    assert sum(p < head for p in killed_at) >= 2, f"killed too late: {killed_at} (head {head})"
    live = _views(dsn)
    clean = state_at(private.dsn("tally_reader"), head)
    for view in projectors.VIEWS:
        assert live[view] == clean[view], f"view {view} differs from a clean rebuild"
    assert sum(len(rows) for rows in live.values()) > 100


def _faulty_apps() -> Projector:
    """The apps projector, with a handler that chokes on apps named `bad-*`."""
    def created(t: Any, e: Any) -> None:
        if e.data["name"].startswith("bad-"):
            raise ValueError(f"cannot handle {e.data['name']}")
        apps.app_created(t, e)
    return Projector("apps", apps.PROJECTOR.tables, {**apps.PROJECTOR.handlers,
                                                     "AppCreated": created},
                     public=apps.PROJECTOR.public, indexes=apps.PROJECTOR.indexes)


def _run(dsn: str, chosen: list[Projector]) -> None:
    conn = connect(dsn, "views", "test")
    try:
        with Ledger(dsn) as ledger:
            runners = [Runner(p, conn) for p in chosen]
            for r in runners:
                r.start()
            catch_up(runners, ledger, ledger.sequence(), batch=1000)
    finally:
        conn.close()


def test_a_failing_handler_stops_its_projector_only(private: Cluster) -> None:
    dsn = private.dsn("tally_owner")
    with Ledger(dsn) as ledger:
        ledger.append("app-fine-one", [NewEvent("AppCreated", {"name": "fine-one", "owner": "a"})])
        ledger.append("app-bad-one", [NewEvent("AppCreated", {"name": "bad-one", "owner": "a"})])
        bad = ledger.sequence()
        ledger.append("app-fine-two", [NewEvent("AppCreated", {"name": "fine-two", "owner": "a"})])
        head = ledger.sequence()
    others = [p for p in projectors.ALL if p.name != "apps"]
    _run(dsn, [_faulty_apps(), *others])
    rows = {r["name"]: r for r in status(private.dsn("tally_reader"))}
    assert rows["apps"]["state"] == "stopped" and rows["apps"]["position"] == bad - 1
    assert rows["apps"]["error"] == {"position": bad, "type": "AppCreated",
                                     "message": "ValueError: cannot handle bad-one"}
    assert rows["apps"]["lag_events"] == head - bad + 1
    assert all(rows[p.name]["position"] == head and rows[p.name]["error"] is None
               for p in others)
    names = {r["name"] for r in _views(dsn)["apps"]}
    assert "fine-one" in names and "fine-two" not in names
    _run(dsn, [projectors.by_name("apps")])  # fixed code, restarted: it goes on
    rows = {r["name"]: r for r in status(private.dsn("tally_reader"))}
    assert rows["apps"]["state"] == "running" and rows["apps"]["position"] == head
    assert {"fine-one", "bad-one", "fine-two"} <= {r["name"] for r in _views(dsn)["apps"]}


def test_rebuild_swaps_without_an_empty_window(private: Cluster) -> None:
    dsn = private.dsn("tally_owner")
    with Ledger(dsn) as ledger:
        fill(ledger, fleet_history(2000, hosts=3, apps=4, prefix="rb"))
    _run(dsn, list(projectors.ALL))
    before = _views(dsn)
    assert before["placements"] and before["routes"]
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        conn = psycopg2.connect(private.dsn("tally_reader"))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while not stop.is_set():
                    cur.execute("SELECT (SELECT count(*) FROM views.placements), "
                                "(SELECT count(*) FROM views.routes)")
                    seen.append(cur.fetchone())
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        wait_until(lambda: len(seen) > 5, 30, "reader never read")
        rebuild(dsn, list(projectors.ALL))
        count = len(seen)
        wait_until(lambda: len(seen) > count + 5, 30, "reader stopped reading")
    finally:
        stop.set()
        reader.join()
    assert not errors
    assert min(p for p, _ in seen) > 0 and min(r for _, r in seen) > 0
    assert _views(dsn) == before
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT min(generation) FROM views.projector_checkpoints")
        assert cur.fetchone()[0] >= 1
    conn.close()


def test_daemon_follows_the_ledger_live(private: Cluster) -> None:
    relays = RelayProcs(private)
    relays.start(0)
    relays.start(1)
    proc = _daemon(private, "--poll-interval", "30", relays=",".join(relays.endpoints))
    dsn = private.dsn("tally_owner")
    projected = Projected(private.dsn("tally_reader"))
    try:
        with Ledger(private.dsn()) as ledger:
            wait_until(lambda: _positions(dsn).get("instances") == ledger.sequence(), 60,
                       "daemon never caught up")
            projected.seen()
            wait_until(lambda: projected.listening, 30, "never listened to the projectors")
            seen = projected.seen()
            ledger.append("instance-live1", [NewEvent("InstanceStarted", {
                "instance_id": "live1", "host_id": "h", "pid": 4242})])

            def visible() -> bool:
                return any(r["instance_id"] == "live1" for r in _views(dsn)["instances"])
            # The poll timer is 30 s: seeing it sooner means a relay woke the daemon.
            wait_until(visible, 20, "the new event never reached the instances view")
            # Its commit told listeners (the API's routing wait is woken by it).
            projected.wait(seen, 20)
            assert projected.generation > seen, "the projectors' commit notified nobody"
        rows = status(private.dsn("tally_reader"))
        assert all(r["state"] == "running" for r in rows)
    finally:
        projected.stop()
        proc.kill()
        proc.wait()
        relays.stop()


def test_projectors_step_over_holes_left_by_retention(private: Cluster) -> None:
    from datetime import UTC, datetime, timedelta

    from ledger.retention import RetentionPolicy, prune

    dsn = private.dsn("tally_owner")
    with Ledger(dsn) as ledger:
        for _ in range(3):
            ledger.append("heartbeat-holes", [NewEvent("HostHeartbeat", {"host_id": "holes"})
                                              for _ in range(1000)])
        ledger.append("app-after-holes", [NewEvent("AppCreated", {"name": "after-holes",
                                                                  "owner": "a"})])
        head = ledger.sequence()
    pruned = prune(dsn, RetentionPolicy("heartbeat", timedelta(0)),
                   now=datetime.now(UTC) + timedelta(hours=1), stream="heartbeat-holes")
    assert pruned == 2999
    _run(dsn, list(projectors.ALL))  # catches up across the hole
    assert set(_positions(dsn).values()) == {head}
    assert "after-holes" in {r["name"] for r in _views(dsn)["apps"]}
    rebuild(dsn, list(projectors.ALL))
    assert _views(dsn) == state_at(private.dsn("tally_reader"), head)
