"""One `tally serve agent` process against a private ledger; the test places instances
itself (as the placer would) and watches real processes answer real HTTP."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from tests.conftest import free_port_range, free_ports
from tests.fixtures.apps import app_tarball, procfile, store
from tests.fixtures.apps.fleet import AgentProc, built
from tests.waiting import wait_until

HOST = "ha"



@pytest.fixture(scope="module")
def agent(private: Cluster) -> Iterator[AgentProc]:
    low, _ = free_port_range(10)
    a = AgentProc(private, HOST, (low, low + 9))
    a.start()
    yield a
    a.kill()
    a.kill_apps()


def events_of(ledger: Ledger, iid: str) -> list[Any]:
    ledger.sequence()
    return ledger.read_stream(f"instance-{iid}")


def has(ledger: Ledger, iid: str, type_: str, **data: Any) -> list[Any]:
    return [e for e in events_of(ledger, iid) if e.type == type_
            and all(e.data.get(k) == v for k, v in data.items())]


def get(port: int, path: str = "/") -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.loads(r.read())


def deploy(ledger: Ledger, home: Path, app: str, data: bytes, procs: dict[str, str],
           config: dict[str, str] | None = None) -> None:
    digest = store(data, home / "bundles")
    events = [NewEvent("AppCreated", {"name": app, "owner": "ann"})]
    if config:
        events.append(NewEvent("ConfigChanged", {"app": app, "set": config,
                                                 "config_version": 1}))
    events.append(NewEvent("ReleaseCreated", {"app": app, "release": 1, "bundle_digest": digest,
                                              "procfile": procs,
                                              "config_version": 1 if config else 0}))
    result = ledger.append(f"app-{app}", events)
    built(ledger, home, app, 1, result.versions[-1], data)


def place(ledger: Ledger, app: str, iid: str, port: int, ptype: str = "web") -> None:
    ledger.append(f"placement-{app}", [NewEvent("InstancePlaced", {
        "instance_id": iid, "app": app, "release": 1, "process_type": ptype,
        "host_id": HOST, "port": port})])


def unplace(ledger: Ledger, app: str, iid: str) -> None:
    ledger.append(f"placement-{app}", [NewEvent("InstanceUnplaced", {
        "instance_id": iid, "app": app, "reason": "test"})])


def test_runs_reports_adopts_and_stops_an_instance(private: Cluster, agent: AgentProc) -> None:
    port = agent.ports[0]
    with Ledger(private.dsn()) as ledger:
        deploy(ledger, agent.home, "hello", app_tarball("hello"), procfile("hello"),
               {"GREETING": "bonjour"})
        place(ledger, "hello", "hello.1.web.x1", port)
        wait_until(lambda: has(ledger, "hello.1.web.x1", "InstanceHealthy"), 240,
                   "the instance healthy (the first run builds the virtualenv)")
        body = get(port)
        assert (body["greeting"], body["release"], body["port"]) == ("bonjour", "1", str(port))
        pid = agent.app_pids()["hello.1.web.x1"]
        started = len(has(ledger, "hello.1.web.x1", "InstanceStarted"))

        agent.kill()  # the agent dies, its app does not
        agent.start()
        wait_until(lambda: len(has(ledger, "hello.1.web.x1", "InstanceHealthy")) >= 2, 60,
                   "the restarted agent adopted the instance")
        assert agent.app_pids() == {"hello.1.web.x1": pid}
        assert len(has(ledger, "hello.1.web.x1", "InstanceStarted")) == started  # not twice
        # ppid read with the rest (p.ppid() of a process that ended meanwhile raises: other
        # tests' processes come and go the whole time, and pids wrap)
        masters = [p for p in psutil.process_iter(["cmdline", "ppid"])
                   if "gunicorn" in " ".join(p.info["cmdline"] or [])
                   and p.info["ppid"] != pid and "app:app" in " ".join(p.info["cmdline"] or [])
                   and any(c.laddr.port == port for c in _listening(p))]
        assert [p.pid for p in masters] == [pid]

        unplace(ledger, "hello", "hello.1.web.x1")
        wait_until(lambda: has(ledger, "hello.1.web.x1", "InstanceStopped"), 30,
                   "the instance stopped")
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        assert agent.app_pids() == {}


def _listening(p: psutil.Process) -> list[Any]:
    try:
        return [c for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


def test_a_crashing_instance_restarts_with_backoff_and_reports_exit_codes(
        private: Cluster, agent: AgentProc) -> None:
    with Ledger(private.dsn()) as ledger:
        deploy(ledger, agent.home, "crasher", app_tarball("crasher"), procfile("crasher"))
        place(ledger, "crasher", "crasher.1.web.c1", agent.ports[0] + 1)
        exits = wait_until(lambda: has(ledger, "crasher.1.web.c1", "InstanceExited",
                                       restarts=3), 60, "three restarts")
        assert exits[0].data["exit_code"] == 3
        assert "SECRET_KEY" in " ".join(exits[0].data["log_tail"])
        unplace(ledger, "crasher", "crasher.1.web.c1")


def test_a_hung_instance_fails_its_http_health_checks_and_is_restarted(
        private: Cluster, agent: AgentProc) -> None:
    iid = "hangs.1.web.h1"
    with Ledger(private.dsn()) as ledger:
        deploy(ledger, agent.home, "hangs", app_tarball("hello"), procfile("hello"),
               {"HANG_AFTER": "1", "TALLY_HEALTHCHECK_PATH": "/"})
        place(ledger, "hangs", iid, agent.ports[0] + 5)
        exits = wait_until(lambda: has(ledger, iid, "InstanceExited"), 60, "killed")
        assert exits[0].data["signal"] == 9
        assert exits[0].data["log_tail"][-1] == (
            "tally: health check failed 3 times in a row: no answer within 1 s on /: killed")
        wait_until(lambda: len(has(ledger, iid, "InstanceStarted")) == 2, 30, "restarted")
        unplace(ledger, "hangs", iid)


def test_stop_apps_on_exit_stops_its_instances(private: Cluster) -> None:
    low = free_ports(1)[0]
    other = AgentProc(private, "hb", (low, low), extra=("--stop-apps-on-exit",))
    other.start()
    try:
        with Ledger(private.dsn()) as ledger:
            deploy(ledger, other.home, "hello-b", app_tarball("hello"), procfile("hello"))
            ledger.append("placement-hello-b", [NewEvent("InstancePlaced", {
                "instance_id": "hello.1.web.hb1", "app": "hello-b", "release": 1,
                "process_type": "web", "host_id": "hb", "port": low})])
            wait_until(lambda: has(ledger, "hello.1.web.hb1", "InstanceHealthy"), 60, "healthy")
            pid = other.app_pids()["hello.1.web.hb1"]
            assert other.terminate() == 0
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
            assert has(ledger, "hello.1.web.hb1", "InstanceStopped",
                       reason="host agent stopped")
    finally:
        other.kill()
        other.kill_apps()


@pytest.mark.skipif(os.geteuid() != 0, reason="per-app users need root")
def test_each_app_runs_as_its_own_user_and_cannot_read_the_others(
        private: Cluster, agent: AgentProc) -> None:
    ports = {"alice": agent.ports[0] + 3, "bob": agent.ports[0] + 4}
    with Ledger(private.dsn()) as ledger:
        for app, port in ports.items():
            deploy(ledger, agent.home, app, app_tarball("hello"), procfile("hello"),
                   {"SECRET": f"{app}-secret"})
            place(ledger, app, f"{app}.1.web.u1", port)
        for app in ports:
            wait_until(lambda app=app: has(ledger, f"{app}.1.web.u1", "InstanceHealthy"), 60,
                       f"{app} healthy")
    alice, bob = get(ports["alice"]), get(ports["bob"])
    assert alice["user"] != bob["user"] and 0 not in (alice["user"], bob["user"])
    releases = agent.home / "agents" / HOST / "releases"
    (bob_release,) = [p for p in (releases / "bob").iterdir() if p.name[0] != "."]
    (alice_release,) = [p for p in (releases / "alice").iterdir() if p.name[0] != "."]

    def read(path: Path) -> dict[str, Any]:
        return get(ports["alice"], f"/read?path={path}")

    assert read(Path("/app/app.py"))["ok"]  # its own slug
    for secret in [bob_release / "app.py", alice_release / "app.py",
                   agent.home / "agents" / HOST / "pids" / "bob.1.web.u1.json",
                   agent.home / "agents" / HOST / "logs" / "bob.1.web.u1.log",
                   agent.home / "bundles" / f"{bob_release.name}.tar.gz",
                   Path(f"/proc/{agent.app_pids()['bob.1.web.u1']}/environ"),
                   private.credentials_file]:
        answer = read(secret)
        hidden = secret.parts[1] == "proc" and "No such file" in answer.get("error", "")
        assert not answer["ok"] and ("denied" in answer["error"] or hidden), (secret, answer)


def test_requests_restarts_and_memory_go_to_the_stats_table(
        private: Cluster, agent: AgentProc) -> None:
    """gunicorn counts its requests (statsd to the agent), the agent adds memory, CPU and
    restarts, and writes a row per instance every 10 s; its own health checks are not
    the app's traffic."""
    import psycopg2

    port = agent.ports[1]
    iid = "hello2.1.web.s1"
    with Ledger(private.dsn()) as ledger:
        deploy(ledger, agent.home, "hello2", app_tarball("hello"), procfile("hello"))
        place(ledger, "hello2", iid, port)
        wait_until(lambda: has(ledger, iid, "InstanceHealthy"), 240, "the instance healthy")
    for _ in range(7):
        get(port)

    def totals() -> tuple[int, int, int] | None:
        conn = psycopg2.connect(private.dsn("tally_reader"))
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT coalesce(sum(requests), 0), count(*), "
                            "coalesce(max(memory_bytes), 0) FROM stats.instance_samples "
                            "WHERE instance_id = %s", (iid,))
                got = cur.fetchone()
        finally:
            conn.close()
        return got if got[0] >= 7 else None

    # a sample every 10 s, each one HTTP write: on a loaded host a minute is a few samples
    requests, samples, memory = wait_until(totals, 120, "7 requests in the stats table")
    assert requests == 7, "health checks counted as traffic"
    assert samples >= 1 and memory > 10 * 2**20  # gunicorn with a worker: tens of MB

    # A new agent adopts the instance and still hears its statsd (gunicorn keeps the port
    # it was started with).
    with Ledger(private.dsn()) as ledger:
        registered = len(ledger.read_stream(f"host-{HOST}"))
        agent.kill()
        agent.start()
        wait_until(lambda: len(ledger.read_stream(f"host-{HOST}")) > registered, 60,
                   "the new agent registered")
    for _ in range(5):
        get(port)
    wait_until(lambda: (got := totals()) and got[0] >= 7 + 5, 120,
               "the adopted instance's requests counted")
    with Ledger(private.dsn()) as ledger:
        unplace(ledger, "hello2", iid)
        wait_until(lambda: has(ledger, iid, "InstanceStopped"), 30, "the instance stopped")
