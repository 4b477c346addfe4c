"""Per-instance stats to PostgreSQL (stats.instance_samples, migration 0005), and the
balancers' router samples beside them (stats.router_samples, migration 0009).

Requests are counted by gunicorn itself: started with `--statsd-host` and `--statsd-prefix
<instance id>`, it sends `<instance id>.gunicorn.requests:1|c` over UDP for every request
it serves. The agent listens on one loopback UDP port for all its instances (the same
port again after a restart, so adopted instances keep reporting: gunicorn never
reconnects, which rules out a Unix socket that dies with the agent); a lost datagram loses
one count, never blocks an app.

Every app can send to that port, so a datagram's words are not trusted: the agent looks up
the socket it came from (its source port, in the kernel's table of UDP sockets,
/proc/net/udp: the uid of whoever made it and its inode, which no app can forge), finds
the instance of that uid's app whose processes hold that socket, and keeps only that
instance's counts. An instance cannot count requests for another app's, nor a sibling's.
Memory and CPU come from psutil over the instance's
process tree (gunicorn's master and workers), restarts from the agent's own count. Every
`Timing.stats_every` seconds one row per running instance is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import psycopg2
from psycopg2.extras import Json, execute_values

from ledger import LedgerUnavailable
from ledger.latency import BUCKETS, percentile

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


ANY_APP = "*"
"""What `owner` says of a uid every app runs as (an agent that is not root): no app's
word can be told from another's there."""


class StatsListener:
    """A statsd sink on 127.0.0.1: counts requests per instance until `take`n, each only
    from a socket of that instance (`owner(sender)`: the instance holding the sending
    socket, ANY_APP or None).

    Its port is kept in `port_file` and bound again by the next agent: the instances it
    adopts were told that port when they started, and cannot be told another."""

    def __init__(self, port_file: Path | None = None,
                 owner: Callable[[Sender], str | None] = lambda sender: ANY_APP,
                 sockets: Path = Path("/proc/net/udp")) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind(("127.0.0.1", int(port_file.read_text()) if port_file else 0))
        except (OSError, ValueError):  # none kept yet, or taken meanwhile: a new one
            self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        if port_file is not None:
            port_file.write_text(str(self.port))
        self.owner, self.sockets = owner, sockets
        self.counts: Counter[str] = Counter()
        self.refused = 0
        """Counts a sender named for an instance not its own."""
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="statsd", daemon=True)
        self.thread.start()

    def gunicorn_args(self, instance_id: str) -> str:
        """What an instance's gunicorn needs to report its requests here."""
        return f"--statsd-host 127.0.0.1:{self.port} --statsd-prefix {instance_id}"

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                batch = [self.sock.recvfrom(65536)]
                self.sock.setblocking(False)
                try:
                    while len(batch) < 1000:
                        batch.append(self.sock.recvfrom(65536))
                except BlockingIOError:
                    pass
                finally:
                    self.sock.settimeout(0.5)
            except TimeoutError:
                continue
            except OSError:
                return
            self._count(batch)

    def _count(self, batch: list[tuple[bytes, Any]]) -> None:
        """One look at the kernel's UDP sockets for a batch of datagrams."""
        try:
            senders = udp_senders(self.sockets.read_text())
        except OSError:
            senders = {}
        for data, (_, port) in batch:
            named = parse(data)
            sender = senders.get(port)
            counts = own_counts(named, self.owner(sender) if sender is not None else None)
            with self.lock:
                self.counts.update(counts)
                self.refused += sum(named.values()) - sum(counts.values())

    def take(self) -> Counter[str]:
        """The counts since the last take."""
        with self.lock:
            counts, self.counts = self.counts, Counter()
        return counts

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@dataclass(frozen=True)
class Sender:
    """The socket a datagram came from, as the kernel knows it."""

    uid: int
    inode: int


def udp_senders(table: str) -> dict[int, Sender]:
    """Local port -> the loopback or wildcard UDP socket on it, from /proc/net/udp's text;
    a port two sockets share is left out (neither can be told from the other)."""
    found: dict[int, list[Sender]] = {}
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        address, _, port = fields[1].partition(":")
        if address not in ("0100007F", "00000000"):
            continue
        try:
            found.setdefault(int(port, 16), []).append(Sender(int(fields[7]), int(fields[9])))
        except ValueError:
            continue
    return {port: senders[0] for port, senders in found.items() if len(senders) == 1}


def own_counts(counts: Counter[str], instance: str | None) -> Counter[str]:
    """Only the counts a sender that is `instance` may report: its own."""
    if instance == ANY_APP:
        return counts
    return Counter({iid: n for iid, n in counts.items() if iid == instance})


def holding(inode: int, leaders: dict[str, int],
            sockets_of: Callable[[int], set[int]]) -> str | None:
    """The instance (of `leaders`: instance id -> its leader pid) whose processes hold the
    socket `inode`, or None."""
    return next((iid for iid, pid in leaders.items() if inode in sockets_of(pid)), None)


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets a process and its descendants hold (root reads any)."""
    try:
        root = psutil.Process(pid)
        pids = [pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.Error:
        return set()
    out = set()
    for p in pids:
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{p}/fd/{fd}")
                if link.startswith("socket:["):
                    out.add(int(link[8:-1]))
    return out


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


SAMPLE_TABLES = ("stats.instance_samples", "stats.router_samples")
"""What `SampleStore.prune` keeps for a while only: `tally stats` reads a week at most."""


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
        self._insert("INSERT INTO stats.instance_samples (app, instance_id, host_id, "
                     "requests, restarts, memory_bytes, cpu_seconds) VALUES %s",
                     [(s.app, s.instance_id, s.host_id, s.requests, s.restarts,
                       s.memory_bytes, s.cpu_seconds) for s in samples])

    def _insert(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        try:
            with self._cursor() as cur:
                execute_values(cur, sql, rows)
        except psycopg2.Error:
            self.close()
            raise

    def prune(self, older_than: timedelta, now: datetime | None = None,
              batch: int = 5000) -> dict[str, int]:
        """Delete the instance and router samples recorded before `now - older_than`, in
        short batches (no long transaction holds the stats' writers back); how many went,
        per table. Needs a role that may delete (the owner: `tally serve retention`)."""
        cutoff = (now or datetime.now(UTC)) - older_than
        gone: dict[str, int] = {}
        try:
            for table in SAMPLE_TABLES:
                gone[table] = 0
                while True:
                    with self._cursor() as cur:
                        cur.execute(f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM "
                                    f"{table} WHERE at < %s LIMIT %s)", (cutoff, batch))
                        gone[table] += cur.rowcount
                    if cur.rowcount < batch:
                        break
        except psycopg2.Error:
            self.close()
            raise
        return gone

    def write_router(self, balancer_id: str, samples: Iterable[dict[str, Any]]) -> None:
        """One INSERT for a balancer's samples (balancer/metrics.py `samples`)."""
        self._insert("INSERT INTO stats.router_samples (app, balancer_id, requests, s1xx, "
                     "s2xx, s3xx, s4xx, s5xx, held, retries, latency_sum, buckets) VALUES %s",
                     [(s["app"], balancer_id, s["requests"], s["s1xx"], s["s2xx"], s["s3xx"],
                       s["s4xx"], s["s5xx"], s["held"], s["retries"], s["latency_sum"],
                       Json(s["buckets"])) for s in samples])

    def read_router(self, app: str, minutes: int) -> dict[str, Any]:
        """What the balancers routed to the app over the last `minutes`, as Heroku's router
        metrics: requests by status class, latency p50/p95/p99 (ms), held, retries."""
        rows = self._rows("""
            SELECT requests, s1xx, s2xx, s3xx, s4xx, s5xx, held, retries, buckets
            FROM stats.router_samples
            WHERE app = %s AND at > now() - make_interval(mins => %s)""", (app, minutes))
        merged = [0] * (len(BUCKETS) + 1)
        for r in rows:
            for i, n in r["buckets"].items():
                if i.isdigit() and int(i) < len(merged):
                    merged[int(i)] += int(n)
        out: dict[str, Any] = {k: sum(r[k] for r in rows) for k in (
            "requests", "s1xx", "s2xx", "s3xx", "s4xx", "s5xx", "held", "retries")}
        for q in (50, 95, 99):
            p = percentile(merged, q / 100)
            out[f"p{q}_ms"] = None if p is None else round(p * 1000, 1)
        return out

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
                "memory_bytes": sum(i["memory_bytes"] or 0 for i in instances),
                "router": self.read_router(app, minutes)}
