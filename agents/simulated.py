"""Simulated host agents (`tally sim --hosts N`, bench/fleet.py): many hosts in a few
processes, over the real API, to size a control plane.

Each simulated host does over HTTP what a host agent does, with its own agent token:
registers, heartbeats every `interval` seconds (spread evenly), reads its desired state
when a heartbeat reply says it moved, and reports each new instance started then healthy
(and stopped when withdrawn), with idempotency keys. No app process runs: the instances
exist only as reports. One asyncio loop per process drives thousands of hosts over a
small pool of keep-alive connections (a real host has its own; what the API sees is the
same request rate). The code here is the shell; what a host says is `SimHost`.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import random
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

PORTS = (20000, 20015)
"""Every simulated host's port range (nothing binds: instances are only reports)."""


@dataclass(frozen=True)
class SimSettings:
    api: str
    interval: float = 5.0
    connections: int = 12
    """Keep-alive connections to the API per process."""
    capacity: int = 16


class Connection:
    """One keep-alive HTTP/1.1 connection, reopened when the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, token: str,
                      body: Any = None) -> tuple[int, dict[str, Any]]:
        for attempt in (1, 2):
            try:
                return await self._once(method, path, token, body)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _once(self, method: str, path: str, token: str,
                    body: Any) -> tuple[int, dict[str, Any]]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        payload = json.dumps(body).encode() if body is not None else b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer "
                f"{token}\r\nContent-Type: application/json\r\nContent-Length: "
                f"{len(payload)}\r\n\r\n").encode()
        self.writer.write(head + payload)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionResetError("closed by the server")
        status = int(status_line.split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        raw = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, (json.loads(raw) if raw else {})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Counts:
    heartbeats: int = 0
    refused: int = 0
    failed: int = 0
    reports: int = 0
    desired_reads: int = 0


@dataclass
class SimHost:
    """One simulated host: what it has been told to run, what it has reported."""

    host_id: str
    token: str
    version: int = 0
    running: set[str] = field(default_factory=set)

    def registration(self) -> dict[str, Any]:
        return {"address": "127.0.0.1", "port_min": PORTS[0], "port_max": PORTS[1],
                "capacity": PORTS[1] - PORTS[0] + 1}

    def heartbeat(self) -> dict[str, Any]:
        return {"load": 0.5, "memory_used_mb": 512, "memory_total_mb": 4096,
                "instances": len(self.running)}

    def converge(self, desired: dict[str, Any]) -> list[tuple[str, str]]:
        """The reports that bring what it runs to what is desired: (instance, type)."""
        wanted = {p["instance_id"] for p in desired["placements"]}
        out = [(i, t) for i in sorted(wanted - self.running)
               for t in ("InstanceStarted", "InstanceHealthy")]
        out += [(i, "InstanceStopped") for i in sorted(self.running - wanted)]
        self.running = wanted
        self.version = desired["version"]
        return out


class Fleet:
    """The hosts of one process, their connections and their counts."""

    def __init__(self, hosts: Sequence[SimHost], settings: SimSettings) -> None:
        url = urllib.parse.urlsplit(settings.api)
        self.hosts, self.settings = hosts, settings
        self.pool: asyncio.Queue[Connection] = asyncio.Queue()
        for _ in range(settings.connections):
            self.pool.put_nowait(Connection(url.hostname or "127.0.0.1", url.port or 80))
        self.counts = Counts()

    async def call(self, host: SimHost, method: str, path: str,
                   body: Any = None) -> tuple[int, dict[str, Any]]:
        conn = await self.pool.get()
        try:
            return await conn.request(method, path, host.token, body)
        finally:
            self.pool.put_nowait(conn)

    async def register(self, host: SimHost) -> None:
        status, answer = await self.call(host, "PUT", f"/hosts/{host.host_id}",
                                         host.registration())
        if status >= 400:
            raise RuntimeError(f"{host.host_id} not registered: {status} {answer}")

    async def live(self, host: SimHost, offset: float, stop: Any, silent: Any) -> None:
        """Heartbeat every interval (starting at `offset`), converging on each move."""
        interval = self.settings.interval
        next_beat = time.monotonic() + offset
        while not stop.is_set():
            await asyncio.sleep(max(0.0, next_beat - time.monotonic()))
            next_beat += interval
            if silent is not None and silent.is_set():
                continue  # this host is "lost": no heartbeat, nothing else
            try:
                status, answer = await self.call(
                    host, "POST", f"/hosts/{host.host_id}/heartbeats", host.heartbeat())
                if status != 202:
                    self.counts.refused += 1
                    continue
                self.counts.heartbeats += 1
                if answer["desired"] > host.version:
                    await self.converge(host)
            except (OSError, asyncio.IncompleteReadError, ValueError, KeyError):
                self.counts.failed += 1

    async def converge(self, host: SimHost) -> None:
        status, desired = await self.call(
            host, "GET", f"/hosts/{host.host_id}/desired?after={host.version}")
        self.counts.desired_reads += 1
        if status != 200 or not desired.get("changed"):
            return
        for iid, type_ in host.converge(desired):
            await self.call(host, "POST", f"/instances/{iid}/events",
                            {"type": type_, "data": {}, "key": uuid.uuid4().hex})
            self.counts.reports += 1


async def _run(hosts: list[SimHost], settings: SimSettings, stop: Any, silent_hosts: set[str],
               silent: Any, ready: Any, shared: Any) -> None:
    fleet = Fleet(hosts, settings)
    for i in range(0, len(hosts), 50):
        await asyncio.gather(*(fleet.register(h) for h in hosts[i:i + 50]))
    ready.release()
    tasks = [asyncio.create_task(fleet.live(
        h, settings.interval * n / len(hosts), stop, silent if h.host_id in silent_hosts
        else None)) for n, h in enumerate(hosts)]
    def publish() -> None:
        with shared.get_lock():
            shared[0], shared[1], shared[2], shared[3] = (
                fleet.counts.heartbeats, fleet.counts.refused, fleet.counts.failed,
                fleet.counts.reports)

    while not stop.is_set():
        await asyncio.sleep(0.2)
        publish()
    # Let each host finish what it is sending (within one interval): a heartbeat cut off
    # after the API took it would be in the ledger and not counted here.
    await asyncio.wait(tasks, timeout=settings.interval + 10)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    publish()  # every heartbeat answered 202 is counted, for a test to compare


def _process(hosts: list[tuple[str, str]], settings: SimSettings, stop: Any,
             silent_hosts: set[str], silent: Any, ready: Any, shared: Any) -> None:
    sims = [SimHost(h, t) for h, t in hosts]
    random.shuffle(sims)  # spread each process's beats over the interval
    asyncio.run(_run(sims, settings, stop, silent_hosts, silent, ready, shared))


class Simulation:
    """N simulated hosts in `processes` processes; `silence(ids)` makes some go quiet."""

    def __init__(self, tokens: dict[str, str], settings: SimSettings, processes: int = 2,
                 silent_hosts: Iterable[str] = ()) -> None:
        self.settings = settings
        ctx = mp.get_context("fork")
        self.stop, self.silent = ctx.Event(), ctx.Event()
        self.ready = ctx.Semaphore(0)
        items = sorted(tokens.items())
        parts = [items[i::processes] for i in range(processes)]
        self.counters = [ctx.Array("q", 4) for _ in parts]
        quiet = set(silent_hosts)
        self.procs = [ctx.Process(target=_process, args=(part, settings, self.stop, quiet,
                                                          self.silent, self.ready, counters),
                                  daemon=True)
                      for part, counters in zip(parts, self.counters, strict=True)]

    def start(self, timeout: float = 300.0) -> None:
        """Start the processes; return once every host registered."""
        for p in self.procs:
            p.start()
        deadline = time.monotonic() + timeout
        for _ in self.procs:
            if not self.ready.acquire(timeout=max(0.1, deadline - time.monotonic())):
                raise TimeoutError("simulated hosts did not all register in time")

    def counts(self) -> Counts:
        total = Counts()
        for c in self.counters:
            with c.get_lock():
                total.heartbeats += c[0]
                total.refused += c[1]
                total.failed += c[2]
                total.reports += c[3]
        return total

    def close(self) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(self.settings.interval + 15)
            if p.is_alive():
                p.kill()
