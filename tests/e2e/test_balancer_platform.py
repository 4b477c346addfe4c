"""The balancers through the platform: a private ledger with relays, projectors, a placer,
two host agents and two balancers reading the routes view through the API (each with its
own balancer token). While clients request an app
through both balancers the whole time, a rolling deploy, a scale-down and a kill -9 of an
instance fail no request (held or retried, never failed); a domain added is served as soon
as it is projected; maintenance answers 503 with its page.

Deploys are the events `tally deploy` appends (as in test_fleet.py).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from api.decide import domain_stream
from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from tests.conftest import RelayProcs, destroy_cluster, free_port_range, free_ports, make_cluster
from tests.fixtures.apps.fleet import (
    AgentProc,
    Daemon,
    api_for,
    create_app,
    placer,
    release,
    scale,
)
from tests.waiting import wait_until

HOST = "hello.tally.local"  # no PlatformSuffixSet in this ledger: the default suffix


@dataclass
class Platform:
    cluster: Cluster
    ledger: Ledger
    agents: dict[str, AgentProc]
    balancer_ports: list[int]
    admin_ports: list[int]

    def router_metrics(self, app: str) -> list[str]:
        """Each balancer's held and retried counts for the app (Prometheus text)."""
        out = []
        for port in self.admin_ports:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
            out += [line for line in text.splitlines() if f'app="{app}"' in line
                    and ("held" in line or "retries" in line or "5xx" in line)]
        return out


def request(port: int, host: str, path: str = "/") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Host": host})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def platform() -> Iterator[Platform]:
    cluster = make_cluster()
    relays = RelayProcs(cluster)
    agents: dict[str, AgentProc] = {}
    daemons: list[Daemon] = []
    try:
        relays.start(0)
        relays.start(1)
        env = {"TALLY_RELAYS": ",".join(relays.endpoints),  # access logs: to no one's
               "TALLY_COLLECTOR": f"tcp://127.0.0.1:{free_ports(1)[0]}"}  # collector
        low, _ = free_port_range(40)
        for i, host in enumerate(["h1", "h2"]):
            agents[host] = AgentProc(cluster, host, (low + 20 * i, low + 20 * i + 19),
                                     relays.endpoints)
            agents[host].start()
        daemons.append(placer(cluster, relays.endpoints))
        daemons.append(Daemon(cluster, "projectors", ["projectors"], **env))
        ports = free_ports(4)
        api = api_for(cluster)
        for i, port in enumerate(ports[:2]):
            daemons.append(Daemon(cluster, f"balancer-{i}", [
                "balancer", "--bind", f"127.0.0.1:{port}", "--hold", "30",
                "--admin", f"127.0.0.1:{ports[2 + i]}", "--balancer-id", f"b{i}"], **env,
                TALLY_BALANCER_API=api.url,
                TALLY_BALANCER_TOKEN=api.token(f"b{i}", "balancer")))
        for d in daemons:
            d.start()
        for port, balancer in zip(ports[:2], daemons[-2:], strict=True):
            up(balancer, port)  # a balancer that died says why, not a timeout minutes later
        with Ledger(cluster.dsn()) as ledger:
            yield Platform(cluster, ledger, agents, ports[:2], ports[2:])
    finally:
        for a in agents.values():
            a.kill()
            a.kill_apps()
        for d in daemons:
            d.kill()
        relays.stop()
        destroy_cluster(cluster)


def accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def up(daemon: Daemon, port: int) -> None:
    """Wait until `daemon` listens on `port`; fail with its log if it exits first."""
    proc = daemon.proc
    assert proc is not None
    wait_until(lambda: accepts(port) or proc.poll() is not None, 60,
               f"{daemon.name} never listened")
    assert proc.poll() is None, daemon.log()[-3000:]


def serves(platform: Platform, host: str, want: int = 200) -> bool:
    def ok(port: int) -> bool:
        try:
            return request(port, host)[0] == want
        except OSError:
            return False
    return all(ok(p) for p in platform.balancer_ports)


class Load:
    """Clients requesting `host` through every balancer on kept-alive connections."""

    def __init__(self, ports: list[int], host: str, per_balancer: int = 2) -> None:
        self.host = host
        self.stop = threading.Event()
        self.answers: list[dict] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self.client, args=(p,))
                        for p in ports for _ in range(per_balancer)]
        for t in self.threads:
            t.start()

    def client(self, port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/", headers={"Host": self.host})
                reply = conn.getresponse()
                body = reply.read()
                if reply.status == 200:
                    self.answers.append(json.loads(body))
                else:
                    self.failures.append(f"{reply.status} {body[:120]!r}")
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                conn.close()
            time.sleep(0.005)  # a steady stream, not a flood: 2 cores serve all of this
        conn.close()

    def progress(self, more: int = 20) -> None:
        n = len(self.answers)
        wait_until(lambda: len(self.answers) >= n + more, 60, "requests stopped being answered")

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def instance_pids(platform: Platform) -> dict[str, int]:
    return {i: pid for a in platform.agents.values() for i, pid in a.app_pids().items()}


def test_deploy_scale_down_and_kill_9_fail_no_request(platform: Platform) -> None:
    led, home = platform.ledger, platform.cluster.root.parent
    create_app(led, "hello")
    scale(led, "hello", web=2)
    release(led, home, "hello", "hello", 1)
    wait_until(lambda: serves(platform, HOST), 240, "hello never served by both balancers")
    load = Load(platform.balancer_ports, HOST)
    try:
        load.progress()
        release(led, home, "hello", "hello", 2)  # a rolling deploy
        wait_until(lambda: {a["release"] for a in load.answers[-20:]} == {"2"}
                   and len(instance_pids(platform)) == 2, 240, "release 2 never took over")
        scale(led, "hello", web=1)  # a scale-down
        wait_until(lambda: len(instance_pids(platform)) == 1, 60, "never scaled down")
        load.progress()
        (instance, pid), = instance_pids(platform).items()
        os.killpg(pid, signal.SIGKILL)  # kill -9 of the instance serving everything
        wait_until(lambda: instance_pids(platform).get(instance, pid) != pid, 60,
                   "the agent never restarted the instance")
        load.progress(50)
    finally:
        load.finish()
    print("\n".join(platform.router_metrics("hello")))
    assert not load.failures, load.failures[:5]
    assert {a["release"] for a in load.answers} == {"1", "2"}
    assert len(load.answers) > 100


def test_domain_added_is_served_once_projected(platform: Platform) -> None:
    led, home = platform.ledger, platform.cluster.root.parent
    create_app(led, "blog")
    scale(led, "blog", web=1)
    release(led, home, "blog", "hello", 1)
    wait_until(lambda: serves(platform, "blog.tally.local"), 240, "blog never served")
    assert serves(platform, "www.blog.test", want=404)
    led.append(domain_stream("www.blog.test"),
               [NewEvent("DomainClaimed", {"domain": "www.blog.test", "app": "blog"})])
    led.append("app-blog", [NewEvent("DomainAdded", {"app": "blog",
                                                     "domain": "www.blog.test"})])
    started = time.monotonic()
    wait_until(lambda: serves(platform, "www.blog.test"), 10, "the domain was never served",
               interval=0.005)
    print(f"domain served {1000 * (time.monotonic() - started):.0f} ms after its append")

    led.append("app-blog", [NewEvent("MaintenanceChanged", {"app": "blog", "enabled": True})])
    wait_until(lambda: serves(platform, "www.blog.test", want=503), 10, "maintenance never on")
    status, body = request(platform.balancer_ports[0], "blog.tally.local")
    assert status == 503 and b"down for maintenance" in body
    led.append("app-blog", [NewEvent("MaintenanceChanged", {"app": "blog", "enabled": False})])
    wait_until(lambda: serves(platform, "blog.tally.local"), 10, "maintenance never off")
    with contextlib.suppress(OSError):
        assert request(platform.balancer_ports[1], "nope.tally.local")[0] == 404
