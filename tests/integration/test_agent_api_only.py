"""A host agent holds no ledger credentials and speaks only to the API; when the API is
away it keeps its apps running, keeps what it observes on disk, in order, and delivers it
once, in order, when the API returns (even across a restart of the agent meanwhile)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import psycopg2

from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from tests.conftest import free_port_range, free_ports
from tests.fixtures.apps.fleet import AgentProc, ApiProc, create_app, release
from tests.waiting import wait_until

API_AWAY_S = float(os.environ.get("TALLY_TEST_API_AWAY_S", "10"))
"""How long the API stays away in the ride-out test (the issue's scenario says 30 s; the
default keeps the suite short, the behaviour is the same)."""



def _place(ledger: Ledger, app: str, iid: str, host: str, port: int) -> None:
    ledger.append(f"placement-{app}", [NewEvent("InstancePlaced", {
        "instance_id": iid, "app": app, "release": 1, "process_type": "web",
        "host_id": host, "port": port})])


def _events(ledger: Ledger, stream: str) -> list[Any]:
    ledger.sequence()
    return ledger.read_stream(stream)


def test_an_agent_without_ledger_credentials_runs_its_host(private: Cluster) -> None:
    """Its TALLY_HOME holds no ledger credentials and its ledger ports lead nowhere; it
    registers, heartbeats, runs its instance and reports it, all through the API."""
    api = ApiProc(private, "api-alone")
    api.start()
    low, _ = free_port_range(2)
    home = Path(tempfile.mkdtemp(prefix="tally-fleet-host-"))
    home.chmod(0o755)  # apps pass through to their own folders (as on a real host)
    agent = AgentProc(private, "hn", (low, low + 1), env={
        "TALLY_HOME": str(home), "TALLY_LEDGER_PORTS": ",".join(map(str, free_ports(2))),
        "TALLY_AGENT_API": api.url, "TALLY_AGENT_TOKEN": api.token("hn")})
    agent.home = home
    try:
        with Ledger(private.dsn()) as ledger:
            create_app(ledger, "alone", {"GREETING": "no credentials"})
            release(ledger, private.root.parent, "alone", "hello", 1, config_version=1)
            agent.start()
            _place(ledger, "alone", "alone.1.web.n1", "hn", low)
            wait_until(lambda: any(e.type == "InstanceHealthy" for e in
                                   _events(ledger, "instance-alone.1.web.n1")), 120,
                       "the instance healthy")
            registered = _events(ledger, "host-hn")[0]
            assert registered.metadata["actor"] == f"agent-hn-{api.port}"
            assert _events(ledger, "heartbeat-hn")
        assert not list(home.rglob("*password*")) and not list(home.rglob("*.pgpass"))
        assert private.credentials_file.exists()
        assert not str(private.credentials_file).startswith(str(home))
        proc = psutil.Process(agent.proc.pid if agent.proc else 0)
        ledger_ports = set(private.spec.ports)
        assert not [c for c in proc.net_connections("tcp")
                    if c.raddr and c.raddr.port in ledger_ports]
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().decode(errors="replace")
        assert "password" not in environ.lower() and "dbname" not in environ
    finally:
        agent.kill()
        agent.kill_apps()
        api.kill()
        shutil.rmtree(home, ignore_errors=True)


def _recorded(dsn: str, stream: str) -> list[tuple[str, str]]:
    """(type, idempotency key) of the stream's events, in order."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT type, idempotency_key FROM ledger.events WHERE stream = %s "
                        "ORDER BY version", (stream,))
            return cur.fetchall()
    finally:
        conn.close()


def _kept(agent: AgentProc) -> list[dict[str, Any]]:
    path = agent.home / "agents" / agent.host_id / "outbox.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_an_agent_rides_out_the_api_being_away(private: Cluster) -> None:
    api = ApiProc(private, "api-away")
    api.start()
    low, _ = free_port_range(2)
    iid = "steady.1.web.w1"
    agent = AgentProc(private, "hw", (low, low + 1), env={
        "TALLY_AGENT_API": api.url, "TALLY_AGENT_TOKEN": api.token("hw")})
    try:
        with Ledger(private.dsn()) as ledger:
            create_app(ledger, "steady")
            release(ledger, private.root.parent, "steady", "hello", 1)
            agent.start()
            _place(ledger, "steady", iid, "hw", low)
            wait_until(lambda: any(e.type == "InstanceHealthy"
                                   for e in _events(ledger, f"instance-{iid}")), 120,
                       "the instance healthy")
            before = len(_events(ledger, f"instance-{iid}"))

            api.kill()  # kill -9: the API is away
            pid = agent.app_pids()[iid]
            os.killpg(pid, signal.SIGKILL)  # the app dies; the agent sees it and restarts it
            wait_until(lambda: _in_order(_kept(agent), RESTART), 60,
                       "exit, restart and health kept in the outbox")
            agent.kill()  # and the agent dies too, with its reports undelivered
            agent.start()
            new_pid = wait_until(lambda: agent.app_pids().get(iid), 30, "pid record")
            assert psutil.pid_exists(new_pid) and new_pid != pid
            observed = len(_kept(agent))
            wait_until(lambda: len(_kept(agent)) > observed, 60,
                       "the restarted agent adopted the app and reported it healthy, kept")
            _keeps_serving(low, API_AWAY_S)
            kept = _kept(agent)
            assert agent.app_pids()[iid] == new_pid and psutil.pid_exists(new_pid)

            api.start()  # the same address: the agent finds it again
            wait_until(lambda: not _kept(agent), 60, "the outbox delivered")
            recorded = _recorded(private.dsn("tally_owner"), f"instance-{iid}")[before:]
            keys = [k.rsplit("/", 1)[-1] for _, k in recorded]
            assert keys[:len(kept)] == [i["key"] for i in kept]  # all, once, in order
            assert len(set(keys)) == len(keys)
            assert _in_order([{"type": t} for t, _ in recorded], RESTART)
    finally:
        agent.kill()
        agent.kill_apps()
        api.kill()


RESTART = ["InstanceExited", "InstanceStarted", "InstanceHealthy"]


def _in_order(items: list[dict[str, Any]], types: list[str]) -> bool:
    """Whether these types occur among the items' types, in this order."""
    seen = iter(i["type"] for i in items)
    return all(t in seen for t in types)


def _keeps_serving(port: int, seconds: float) -> None:
    """The outage itself: for `seconds`, the app answers every check."""
    end = time.monotonic() + seconds

    def check() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert r.status == 200, "the app stopped answering while the API was away"
        return time.monotonic() >= end
    wait_until(check, seconds + 30, "the outage over", interval=0.5)
