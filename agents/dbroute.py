"""The apps' cluster's stable address as a kernel rule: a destination NAT (nftables, in the
output hook) from the stable port to the port of the node Patroni calls primary, repointed
by this watcher of Patroni's REST API. An app's packets then go straight to PostgreSQL: no
proxy process copies them, so the stable address costs what a direct connection does (a
user-space proxy such as HAProxy adds two socket hops and a wake-up to every round trip).

Only connections made on this machine are translated (the output hook), which is where the
URL points (127.0.0.1). Each tick asks every node's Patroni `GET /primary` (200 only on the
running leader) and trusts an answer, and a node's PostgreSQL port, only if the socket
listening there belongs to the cluster's OS user: an app that takes a stopped node's REST or
PostgreSQL port cannot draw the apps' connections (and their passwords) to itself. With no
primary the rule goes and the stable port answers nothing; the watcher itself listens on
it, so no app can take it either (connections that reach it are closed at once).

A failover costs the app its open connections, as with any proxy: Patroni restarts a
demoted primary (its sessions end) and a crashed one has none left; conntrack keeps an
established connection on the node it was translated to, new ones go to the new primary.
The agents' reach rules (agents/netrules.py) allow an app its add-on ports by the port it
asked for (conntrack's original destination), so the node ports behind stay closed to it.

Runs as root (nftables): `python -m agents.dbroute ROUTE.json`, started and stopped with the
cluster's etcd and Patroni (agents/appsdb.py), under supervisord with `tally up`. It deletes
its table when it stops.
"""

from __future__ import annotations

import http.client
import json
import logging
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tally.dbroute")
TICK = 0.25
"""Seconds between two rounds of questions to Patroni (HAProxy's fastinter in Patroni's
documentation)."""
COVERS = {"127.0.0.1": ("127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1")}
"""Listening addresses that receive a connection to the key (a wildcard takes it too)."""


@dataclass(frozen=True)
class Node:
    name: str
    pg_port: int
    rest_port: int


@dataclass(frozen=True)
class Route:
    """One cluster's stable address: where apps connect and the nodes behind it."""

    table: str
    host: str
    port: int
    nodes: tuple[Node, ...]
    os_user: str

    def to_json(self) -> str:
        return json.dumps({"table": self.table, "host": self.host, "port": self.port,
                           "os_user": self.os_user,
                           "nodes": [[n.name, n.pg_port, n.rest_port] for n in self.nodes]})

    @classmethod
    def from_json(cls, text: str) -> Route:
        d = json.loads(text)
        return cls(d["table"], d["host"], d["port"], tuple(Node(*n) for n in d["nodes"]),
                   d["os_user"])


def table_name(port: int) -> str:
    """The route's nftables table: one per stable port (clusters of several platforms or
    tests on one machine never share one)."""
    return f"tally_appsdb_{port}"


def render(route: Route, target: int | None) -> str:
    """The nft script that replaces the route's table, atomically: a DNAT from the stable
    port to `target`, or no rule (None: no primary)."""
    lines = [f"table ip {route.table} {{}}", f"delete table ip {route.table}",
             f"table ip {route.table} {{", "  chain output {",
             "    type nat hook output priority -100; policy accept;"]
    if target is not None:
        lines.append(f"    ip daddr {route.host} tcp dport {route.port} "
                     f"dnat to {route.host}:{target}")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def choose(route: Route, primary: Callable[[Node], bool],
           owned: Callable[[int], bool]) -> int | None:
    """The PostgreSQL port to translate to: the one node whose Patroni (on a port of the
    cluster's user) says it is primary and whose PostgreSQL port is the cluster user's."""
    leaders = [n for n in route.nodes if owned(n.rest_port) and owned(n.pg_port)
               and primary(n)]
    return leaders[0].pg_port if len(leaders) == 1 else None


def listeners(tables: Mapping[str, str] | None = None) -> dict[tuple[str, int], set[int]]:
    """(address, port) -> uids of the TCP sockets listening there, from /proc/net/tcp{,6}."""
    out: dict[tuple[str, int], set[int]] = {}
    for path, family in (tables or {"/proc/net/tcp": "4", "/proc/net/tcp6": "6"}).items():
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            out.setdefault((_address(hex_addr, family), int(hex_port, 16)),
                           set()).add(int(fields[7]))
    return out


def _address(hex_addr: str, family: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if family == "4":
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc prints an IPv6 address as four host-order 32-bit words
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def owned_by(uid: int, host: str, listening: dict[tuple[str, int], set[int]]) -> Callable[
        [int], bool]:
    """Whether every socket that would take a connection to host:port belongs to `uid`
    (and there is one)."""
    def check(port: int) -> bool:
        uids = set().union(*(listening.get((a, port), set())
                             for a in COVERS.get(host, (host,))))
        return uids == {uid}
    return check


def is_primary(host: str, node: Node, timeout: float = 0.5) -> bool:
    """Patroni's answer to `GET /primary` on the node's REST port: 200 only on the leader."""
    conn = http.client.HTTPConnection(host, node.rest_port, timeout=timeout)
    try:
        conn.request("GET", "/primary")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


# --- the shell ------------------------------------------------------------------------------


class Router:
    """Holds the stable port and keeps the table pointing at the primary."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.uid = pwd.getpwnam(route.os_user).pw_uid
        self.target: int | None = None
        self.applied = False
        self.stopped = threading.Event()

    def hold_port(self) -> socket.socket:
        """Listen on the stable port (nobody else may), closing what reaches it: only
        connections made while there is no primary do."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.route.host, self.route.port))
        sock.listen(64)

        def refuse() -> None:
            while not self.stopped.is_set():
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                conn.close()
        threading.Thread(target=refuse, daemon=True, name="refuse").start()
        return sock

    def tick(self) -> None:
        owned = owned_by(self.uid, self.route.host, listeners())
        target = choose(self.route, lambda n: is_primary(self.route.host, n), owned)
        if target != self.target or not self.applied:
            apply(render(self.route, target))
            log.info("stable port %s -> %s", self.route.port, target or "nothing (no primary)")
            self.target, self.applied = target, True

    def run(self) -> None:
        held = self.hold_port()
        try:
            while not self.stopped.is_set():
                try:
                    self.tick()
                except NftError as exc:
                    log.error("%s", exc)
                    self.applied = False
                self.stopped.wait(TICK)
        finally:
            held.close()
            remove(self.route.table)


class NftError(Exception):
    """nft refused the script (its message)."""


def _nft() -> str:
    return shutil.which("nft") or "/usr/sbin/nft"  # a supervisor's PATH may lack sbin


def apply(script: str) -> None:
    proc = subprocess.run([_nft(), "-f", "-"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NftError(f"nft refused the route: {proc.stderr.strip()[:300]}")


def remove(table: str) -> None:
    subprocess.run([_nft(), "delete", "table", "ip", table], capture_output=True)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dbroute %(message)s")
    router = Router(Route.from_json(Path(argv[0]).read_text()))
    signal.signal(signal.SIGTERM, lambda *_: router.stopped.set())
    signal.signal(signal.SIGINT, lambda *_: router.stopped.set())
    router.run()


if __name__ == "__main__":
    main(sys.argv[1:])
