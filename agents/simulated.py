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
import contextlib
import json
import math
import multiprocessing as mp
import os
import random
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

DIGITS = b"0123456789"
PORTS = (20000, 20015)
"""Every simulated host's port range (nothing binds: instances are only reports)."""


@dataclass(frozen=True)
class SimSettings:
    api: str
    interval: float = 5.0
    connections: int = 48
    """Keep-alive connections to the API per process, for heartbeats: enough that beats
    wait in the API's queue, as a real fleet's (a connection per host) do, and not for a
    connection here."""
    report_connections: int = 4
    """Keep-alive connections per process for the rest (desired state reads, reports):
    in a real fleet one host's slow report never holds another host's heartbeat back, so
    they do not queue for the heartbeats' connections here either. Registrations have as
    many of their own. Few: each of these requests holds one of the API's threads while
    its append waits for the standby, and those threads answer the heartbeats too."""
    capacity: int = 16
    nice: int = 0
    """Added to the simulator processes' niceness (bench/fleet.py: -5). The simulator
    stands for machines with CPUs of their own: on a shared machine it should send on time
    and leave the control plane to cope, not be made late by it."""


def request_bytes(method: str, path: str, host: str, token: str, body: Any = None) -> bytes:
    """An HTTP/1.1 request, whole (a host's heartbeat is the same bytes each time: made
    once)."""
    payload = json.dumps(body).encode() if body is not None else b""
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            ).encode() + payload


class Connection:
    """One keep-alive HTTP/1.1 connection, reopened when the server closed it, and after
    `rotate` requests: a real fleet has a connection per host, which the API's workers
    share out as they accept them; a few long-lived ones would stay with whichever worker
    took them first and leave the other idle."""

    def __init__(self, host: str, port: int, rotate: int = 200) -> None:
        self.host, self.port, self.rotate = host, port, rotate
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = 0

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """The status and raw body of the answer to these request bytes (one retry on a
        fresh connection if the kept one was closed under it)."""
        for attempt in (1, 2):
            try:
                return await self._once(request)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _once(self, request: bytes) -> tuple[int, bytes]:
        if self.writer is None or self.used >= self.rotate:
            self.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.used += 1
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"content-length:")
        length = int(lower[at + 15:lower.index(b"\r\n", at)]) if at >= 0 else 0
        raw = await self.reader.readexactly(length) if length else b""
        if b"connection: close" in lower:
            self.close()
        return status, raw

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
        self.used = 0


def beat_after(due: float, now: float, interval: float) -> float:
    """When to beat next, after the beat due at `due` went at `now`: one interval on, or if
    that is past already, the next time on the host's own phase (the beats missed are not
    sent in a burst)."""
    due += interval
    if now > due:
        due += interval * math.ceil((now - due) / interval)
    return due


@dataclass
class Counts:
    heartbeats: int = 0
    refused: int = 0
    failed: int = 0
    reports: int = 0
    desired_reads: int = 0
    max_gap_ms: int = 0
    """The longest time a host went between two accepted heartbeats (the placer's TTL
    is judged against the like: a gap longer than the TTL is a host lost by the
    simulator's fault, not the control plane's)."""
    late: int = 0
    """Heartbeats accepted more than two intervals after the host's previous one."""


@dataclass
class SimHost:
    """One simulated host: what it has been told to run, what it has reported."""

    host_id: str
    token: str
    version: int = 0
    running: set[str] = field(default_factory=set)
    beat: bytes = b""
    """This host's heartbeat request, remade only when what it runs changes."""
    heard: float = 0.0
    """When its last heartbeat was accepted (monotonic)."""
    converging: bool = False

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
        self.address = url.hostname or "127.0.0.1"
        self.pool: asyncio.Queue[Connection] = asyncio.Queue()
        for _ in range(settings.connections):
            self.pool.put_nowait(Connection(self.address, url.port or 80))
        self.counts = Counts()
        self.registering: asyncio.Queue[Connection] = asyncio.Queue()
        self.reporting: asyncio.Queue[Connection] = asyncio.Queue()
        for queue, count in ((self.registering, settings.report_connections),
                             (self.reporting, settings.report_connections)):
            for _ in range(count):
                queue.put_nowait(Connection(self.address, url.port or 80))
        self.converging: set[asyncio.Task[None]] = set()

    async def send(self, request: bytes,
                   pool: asyncio.Queue[Connection] | None = None) -> tuple[int, bytes]:
        pool = pool or self.pool
        conn = await pool.get()
        try:
            return await conn.send(request)
        finally:
            pool.put_nowait(conn)

    async def call(self, host: SimHost, method: str, path: str,
                   body: Any = None) -> tuple[int, dict[str, Any]]:
        status, raw = await self.send(request_bytes(method, path, self.address, host.token,
                                                    body), self.reporting)
        return status, (json.loads(raw) if raw else {})

    async def heartbeat(self, host: SimHost) -> tuple[int, int]:
        """Send the host's heartbeat: (status, the desired version its answer names). The
        answer is read for that one number only: the simulator is to load the API, not
        itself."""
        if not host.beat:
            host.beat = request_bytes("POST", f"/hosts/{host.host_id}/heartbeats",
                                      self.address, host.token, host.heartbeat())
        status, raw = await self.send(host.beat)
        at = raw.find(b'"desired":')
        if status != 202 or at < 0:
            return status, 0
        start = at + 10
        while start < len(raw) and raw[start] in b" \t":
            start += 1
        end = start
        while end < len(raw) and raw[end] in DIGITS:
            end += 1
        return status, int(raw[start:end])

    async def register(self, host: SimHost) -> None:
        # Connections of their own: the registered hosts' beats, queued for the others,
        # would hold registration back, and those waiting to register keep beats waiting.
        status, raw = await self.send(request_bytes(
            "PUT", f"/hosts/{host.host_id}", self.address, host.token, host.registration()),
            self.registering)
        answer = json.loads(raw) if raw else {}
        if status >= 400:
            raise RuntimeError(f"{host.host_id} not registered: {status} {answer}")

    async def live(self, host: SimHost, offset: float, stop: Any, silent: Any) -> None:
        """Heartbeat every interval (starting at `offset`), converging on each move. A beat
        that comes late is not followed by the ones it missed in a burst: an agent's timer
        does not catch up (a simulator that did would offer more the slower the API is)."""
        interval = self.settings.interval
        next_beat = time.monotonic() + offset
        while not stop.is_set():
            await asyncio.sleep(max(0.0, next_beat - time.monotonic()))
            next_beat = beat_after(next_beat, time.monotonic(), interval)
            if silent is not None and silent.is_set():
                continue  # this host is "lost": no heartbeat, nothing else
            try:
                status, desired = await self.heartbeat(host)
                if status != 202:
                    self.counts.refused += 1
                    continue
                self._heard(host)
                if desired > host.version and not host.converging:
                    # beside the beats, as an agent's reconcile loop is: a slow report must
                    # not make the host late with its next heartbeat
                    host.converging = True
                    task = asyncio.create_task(self.converge(host))
                    self.converging.add(task)
                    task.add_done_callback(self.converging.discard)
            except (OSError, asyncio.IncompleteReadError, ValueError, KeyError):
                self.counts.failed += 1

    def _heard(self, host: SimHost) -> None:
        now = time.monotonic()
        self.counts.heartbeats += 1
        if host.heard:
            gap = now - host.heard
            self.counts.max_gap_ms = max(self.counts.max_gap_ms, int(gap * 1000))
            if gap > 2 * self.settings.interval:
                self.counts.late += 1
        host.heard = now

    async def converge(self, host: SimHost) -> None:
        try:
            status, desired = await self.call(
                host, "GET", f"/hosts/{host.host_id}/desired?after={host.version}")
            self.counts.desired_reads += 1
            if status != 200 or not desired.get("changed"):
                return
            reports = host.converge(desired)
            host.beat = b""  # it says how many instances run
            for iid, type_ in reports:
                await self.call(host, "POST", f"/instances/{iid}/events",
                                {"type": type_, "data": {}, "key": uuid.uuid4().hex})
                self.counts.reports += 1
        except (OSError, asyncio.IncompleteReadError, ValueError, KeyError):
            self.counts.failed += 1
        finally:
            host.converging = False


async def _run(hosts: list[SimHost], settings: SimSettings, stop: Any, silent_hosts: set[str],
               silent: Any, ready: Any, shared: Any) -> None:
    fleet = Fleet(hosts, settings)
    # Each host beats from the moment it registered, as an agent does: registering 10,000
    # hosts takes longer than a TTL, and hosts that waited for the last one were lost.
    tasks: list[asyncio.Task[None]] = []
    for i in range(0, len(hosts), 50):
        chunk = hosts[i:i + 50]
        await asyncio.gather(*(fleet.register(h) for h in chunk))
        tasks += [asyncio.create_task(fleet.live(
            h, settings.interval * (i + n) / len(hosts), stop,
            silent if h.host_id in silent_hosts else None)) for n, h in enumerate(chunk)]
    ready.release()
    def publish() -> None:
        with shared.get_lock():
            c = fleet.counts
            shared[:] = [c.heartbeats, c.refused, c.failed, c.reports, c.max_gap_ms, c.late]

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
    if settings.nice:
        with contextlib.suppress(OSError):  # raising priority takes root
            os.nice(settings.nice)
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
        self.counters = [ctx.Array("q", 6) for _ in parts]
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
                total.max_gap_ms = max(total.max_gap_ms, c[4])
                total.late += c[5]
        return total

    def close(self) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(self.settings.interval + 15)
            if p.is_alive():
                p.kill()
