"""Per-instance stats to PostgreSQL (stats.instance_samples, migration 0005).

Requests are counted by gunicorn itself: started with `--statsd-host unix:<socket>` and
`--statsd-prefix <instance id>`, it sends `<instance id>.gunicorn.requests:1|c` for every
request it serves. The agent listens on one Unix datagram socket for all its instances (the
same path again after a restart, so adopted instances keep reporting); a lost datagram
loses one count, never blocks an app.

Every app can write to that socket, so a datagram's words are not trusted: the kernel
attaches its sender's pid to each one (SO_PASSCRED), and a count is kept only when the
sender is a process of the instance the metric names (its session: each instance leads
its own). An app cannot count requests for another app's instance, nor for a sibling; a
UDP port would take anyone's word. Memory and CPU come from psutil over the instance's
process tree (gunicorn's master and workers), restarts from the agent's own count. Every
`Timing.stats_every` seconds one row per running instance is written.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg2
from psycopg2.extras import execute_values

from ledger import LedgerUnavailable

log = logging.getLogger("tally.stats")
SUFFIX = b".gunicorn.requests"


def parse(datagram: bytes) -> Counter[str]:
    """Request counts per instance id in one statsd datagram (one metric per line)."""
    counts: Counter[str] = Counter()
    for line in datagram.splitlines():
        name, _, rest = line.partition(b":")
        value, _, kind = rest.partition(b"|")
        if name.endswith(SUFFIX) and kind.startswith(b"c"):
            try:
                counts[name[: -len(SUFFIX)].decode()] += int(float(value))
            except (ValueError, UnicodeDecodeError):
                continue
    return counts


class StatsListener:
    """A statsd sink on a Unix datagram socket at `path`: counts requests per instance
    until `take`n, each only from a process of that instance (`owner(pid)`: the instance
    a sender pid belongs to, or None)."""

    def __init__(self, path: Path, owner: Callable[[int], str | None]) -> None:
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise ValueError(f"{path} is too long for a Unix socket (at most "
                             f"{MAX_SOCKET_PATH} bytes): choose a shorter TALLY_HOME")
        self.path, self.owner = path, owner
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        path.unlink(missing_ok=True)  # the last agent's: bound again, at the same path
        self.sock.bind(str(path))
        path.chmod(0o666)  # every app may send; the kernel says who sent (SO_PASSCRED)
        self.sock.settimeout(0.5)
        self.counts: Counter[str] = Counter()
        self.refused = 0
        """Datagrams naming an instance their sender is not part of."""
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="statsd", daemon=True)
        self.thread.start()

    def gunicorn_args(self, instance_id: str) -> str:
        """What an instance's gunicorn needs to report its requests here."""
        return f"--statsd-host unix:{self.path} --statsd-prefix {instance_id}"

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(65536, CREDENTIALS_SPACE)
            except TimeoutError:
                continue
            except OSError:
                return
            named = parse(data)
            counts = own_counts(named, sender_pid(ancillary), self.owner)
            with self.lock:
                self.counts.update(counts)
                self.refused += len(named) - len(counts)

    def take(self) -> Counter[str]:
        """The counts since the last take."""
        with self.lock:
            counts, self.counts = self.counts, Counter()
        return counts

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


MAX_SOCKET_PATH = 107
CREDENTIALS = struct.Struct("3i")
"""struct ucred: pid, uid, gid."""
CREDENTIALS_SPACE = socket.CMSG_SPACE(CREDENTIALS.size)


def sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The sender's pid from a datagram's SCM_CREDENTIALS (the kernel's word, not its)."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS \
                and len(data) >= CREDENTIALS.size:
            return CREDENTIALS.unpack_from(data)[0]
    return None


def own_counts(counts: Counter[str], pid: int | None,
               owner: Callable[[int], str | None]) -> Counter[str]:
    """Only the counts a sender may report: those of the instance it is part of."""
    mine = owner(pid) if pid else None
    return Counter({iid: n for iid, n in counts.items() if mine is not None and iid == mine})


def session_owner(leaders: Callable[[], dict[int, str]]) -> Callable[[int], str | None]:
    """`owner` for StatsListener: the instance whose session (led by its pid: each
    instance starts its own) the sender is in. `leaders`: leader pid -> instance id now."""
    def owner(pid: int) -> str | None:
        try:
            return leaders().get(os.getsid(pid))
        except OSError:  # gone already
            return None

    return owner


@dataclass
class Traffic:
    """An instance's requests minus the agent's own health checks, reported once each.

    gunicorn's count of a check can reach us a sample after the check itself, so the
    subtraction is done on running totals: a sample may lag by a check, none is lost."""

    served: Counter[str] = field(default_factory=Counter)
    checked: Counter[str] = field(default_factory=Counter)
    reported: Counter[str] = field(default_factory=Counter)

    def keep_only(self, instance_ids: set[str]) -> None:
        """Forget instances this host no longer runs."""
        for counts in (self.served, self.checked, self.reported):
            for gone in set(counts) - instance_ids:
                del counts[gone]

    def report(self, instance_id: str) -> int:
        """Requests of the app's own traffic since the last report."""
        due = max(0, self.served[instance_id] - self.checked[instance_id])
        new = max(0, due - self.reported[instance_id])
        self.reported[instance_id] += new
        return new


@dataclass(frozen=True)
class Sample:
    app: str
    instance_id: str
    host_id: str
    requests: int
    restarts: int
    memory_bytes: int | None
    cpu_seconds: float | None


def usage(pid: int) -> tuple[int | None, float | None]:
    """Resident memory and CPU seconds of a process and its children (None: gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None, None
    memory, cpu = 0, 0.0
    for p in procs:
        try:
            memory += p.memory_info().rss
            times = p.cpu_times()
            cpu += times.user + times.system
        except psutil.Error:
            continue
    return memory, round(cpu, 3)


class SampleStore:
    """The one writer and reader of stats.instance_samples, on a connection of its own
    (made on first use, made again after a failure): stats never share the ledger's."""

    def __init__(self, dsn: str, application_name: str = "tally-stats") -> None:
        self.dsn = dsn
        self.application_name = application_name
        self._conn: Any = None

    def _cursor(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg2.connect(self.dsn, application_name=self.application_name)
            self._conn.autocommit = True
        return self._conn.cursor()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def write(self, samples: Iterable[Sample]) -> None:
        """One INSERT for all samples."""
        rows = [(s.app, s.instance_id, s.host_id, s.requests, s.restarts, s.memory_bytes,
                 s.cpu_seconds) for s in samples]
        if not rows:
            return
        try:
            with self._cursor() as cur:
                execute_values(cur, "INSERT INTO stats.instance_samples (app, instance_id, "
                               "host_id, requests, restarts, memory_bytes, cpu_seconds) "
                               "VALUES %s", rows)
        except psycopg2.Error:
            self.close()
            raise

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        try:
            with self._cursor() as cur:
                cur.execute(sql, params)
                names = [c.name for c in cur.description]
                return [{n: v.isoformat() if isinstance(v, datetime) else v
                         for n, v in zip(names, r, strict=True)} for r in cur.fetchall()]
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            self.close()
            raise LedgerUnavailable(f"stats unreachable: {str(exc).strip()}") from exc

    def read(self, app: str, minutes: int) -> dict[str, Any]:
        """An app's traffic and resources over the last `minutes`, from the agents' samples
        (stats.instance_samples): per instance the requests served, the latest memory and
        restart count, and CPU use (CPU seconds are cumulative per process tree, so a sample
        below the one before marks a restart and is left out); for the app, totals and
        requests per minute."""
        window = "app = %s AND at > now() - make_interval(mins => %s)"
        instances = self._rows(f"""
            WITH s AS (
                SELECT instance_id, host_id, at, requests, restarts, memory_bytes,
                       cpu_seconds - lag(cpu_seconds) OVER w AS cpu,
                       extract(epoch FROM at - lag(at) OVER w) AS seconds,
                       row_number() OVER (PARTITION BY instance_id ORDER BY at DESC) AS newest
                FROM stats.instance_samples WHERE {window}
                WINDOW w AS (PARTITION BY instance_id ORDER BY at))
            SELECT instance_id, max(host_id) AS host_id, sum(requests)::bigint AS requests,
                   max(memory_bytes) FILTER (WHERE newest = 1) AS memory_bytes,
                   max(restarts) FILTER (WHERE newest = 1) AS restarts,
                   round((100 * sum(cpu) FILTER (WHERE cpu >= 0)
                          / nullif(sum(seconds) FILTER (WHERE cpu >= 0), 0))::numeric, 1)::float
                       AS cpu_percent,
                   max(at) AS last_sample_at
            FROM s GROUP BY instance_id ORDER BY instance_id""", (app, minutes))
        series = self._rows(f"""
            SELECT date_trunc('minute', at) AS minute, sum(requests)::bigint AS requests
            FROM stats.instance_samples WHERE {window} GROUP BY 1 ORDER BY 1""", (app, minutes))
        total = sum(i["requests"] for i in instances)
        return {"app": app, "minutes": minutes, "instances": instances, "series": series,
                "requests": total, "requests_per_minute": round(total / minutes, 1),
                "memory_bytes": sum(i["memory_bytes"] or 0 for i in instances)}
