"""What an app may connect to on its host: its own ports, its add-ons and the outside world;
not other apps' backend ports (which would bypass the balancers and maintenance), the
agents' control ports, the collector, the ledger or anything else of the platform's.

Enforced with nftables in the output hook, matching the connecting socket's owner (`meta
skuid`: each app runs as its own user, agents/users.py) and a destination that is this host
(`fib daddr type local`: loopback and the host's own addresses): per app uid, accept its own
and its add-ons' ports (and DNS), reject the rest of this host. Replies of connections made
to an app (conntrack's established) pass. Other hosts' ports are theirs to guard.

The agent's port range is guarded on the way in and out too (`Backends`). In: a new
connection to a port of the range is accepted only at the agent's address (an app that
binds 0.0.0.0 itself is still reached only where the agent decided) and only from this
host or the addresses the operator names (`--backend-clients`: the balancers on other
hosts); every other machine is refused (a reset, not silence: a client trying ::1 first
falls back at once). Out: a SYN-ACK from an instance's port leaves only
from a socket of that instance's app or of the agent's making (`meta skuid` of the
listener: a socket's owner is who made it, and gunicorn listens on one the agent hands
it): a process of another app that took the port in the moment a web command that binds
$PORT itself is started (agents/ports.py) answers no one, and the agent evicts it at the
instance's next start.

The rule set is a pure function of the desired state (`render`); the agent applies it in a
table of its own (one per agent: agents sharing a machine never touch each other's), as one
atomic `nft -f` transaction, only when it changed, and deletes the table when it stops.
Apps that connect as root (the agent's health checks, the balancers) are not affected.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger("tally.agent")
DNS = 53
LOCAL_HOSTS = re.compile(r"^(localhost|127\.\d+\.\d+\.\d+|::1|0\.0\.0\.0)$")


@dataclass(frozen=True)
class Reach:
    """What one app (by its uid) may connect to on this host."""

    uid: int
    ports: frozenset[int]
    """Its instances' ports here, and its add-ons' local ports."""


def addon_ports(places: Iterable[str], address: str = "127.0.0.1",
                allowed: frozenset[int] = frozenset()) -> set[int]:
    """The ports on this host of the app's add-ons (`places`: where each runs, host:port,
    as the ledger's AddonCreated/AddonAttached say): its own and those attached to it, never
    another app's (config is the member's to set: a `*_URL` naming another app's Redis
    opens nothing). Only the platform's add-on ports (`allowed`) count, so a place can
    never open the ledger, an agent's control port or another tenant's backend."""
    out = set()
    for place in places:
        host, _, port = place.rpartition(":")
        host = host.strip("[]")
        if (port.isdigit() and int(port) in allowed
                and (host == address or LOCAL_HOSTS.match(host))):
            out.add(int(port))
    return out


def table_name(root: str, pid: int) -> str:
    """The nftables table of the agent (root: cgroups.root_name) running as `pid`: the pid
    lets any agent on the machine find the tables of agents killed -9 (`stale`)."""
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', root)}_p{pid}"


def stale(tables: Iterable[str], mine: str, alive: Callable[[int], bool]) -> list[str]:
    """The agent tables to delete: those of dead agents, and earlier ones of this agent."""
    out = []
    prefix = mine.rsplit("_p", 1)[0] + "_p"
    for name in tables:
        match = re.fullmatch(r"tally_\w+_p(\d+)", name)
        if name.startswith("tally_builds_"):  # a builder's (agents/buildnet.py), not ours
            continue
        if match and name != mine and (name.startswith(prefix) or not alive(int(match[1]))):
            out.append(name)
    return out


@dataclass(frozen=True)
class Backends:
    """The agent's port range as the network meets it."""

    address: str
    low: int
    high: int
    owners: Mapping[int, int] = field(default_factory=dict)
    """Port -> uid of the app whose instance listens there."""
    clients: tuple[str, ...] = ()
    """Addresses or networks besides this host that may connect (other hosts' balancers)."""


def render(table: str, reach: Iterable[Reach], shared: Iterable[int] = (),
           backends: Backends | None = None) -> str:
    """The nft script that replaces `table` with rules for these apps, atomically.
    `shared`: ports every app may reach here besides DNS (the agent's statsd port, where
    each datagram counts only for its sender's app: agents/stats.py). `backends`: the
    agent's range, guarded in and out."""
    common = {DNS, *shared}
    merged: dict[int, set[int]] = {}
    for r in reach:
        merged.setdefault(r.uid, set()).update(r.ports)
    lines = [f"table inet {table} {{}}", f"delete table inet {table}",
             f"table inet {table} {{",
             "  chain output {",
             "    type filter hook output priority 0; policy accept;"]
    if backends is not None:  # before `established`: a SYN-ACK is a reply
        lines += [f"    tcp sport {port} tcp flags & (syn | ack) == syn | ack "
                  f"meta skuid != {{ 0, {uid} }} drop"  # 0: a socket the agent made, handed
                  for port, uid in sorted(backends.owners.items())]
    lines.append("    ct state established,related accept")
    for uid, ports in sorted(merged.items()):
        allowed = ", ".join(str(p) for p in sorted(common | ports))
        # The port the app asked for (conntrack's original destination): the apps' database
        # cluster's stable port is translated to a node's (agents/dbroute.py), whose own
        # port stays closed to it.
        lines.append(f"    meta skuid {uid} fib daddr type local meta l4proto {{ tcp, udp }} "
                     f"ct original proto-dst {{ {allowed} }} accept")
        lines.append(f"    meta skuid {uid} fib daddr type local reject")
    lines.append("  }")
    if backends is not None:
        lines += _input_chain(backends)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _input_chain(b: Backends) -> list[str]:
    """New connections to the range: at the agent's address only, from this host or the
    named clients only; the rest reset."""
    family, other = ("ip6", "ipv4") if ":" in b.address else ("ip", "ipv6")
    ports = f"tcp dport {b.low}-{b.high}"
    lines = ["  chain input {", "    type filter hook input priority 0; policy accept;",
             "    ct state established,related accept"]
    try:
        ipaddress.ip_address(b.address)
        lines += [f"    meta nfproto {other} {ports} reject with tcp reset",
                  f"    {family} daddr != {b.address} {ports} reject with tcp reset"]
    except ValueError:  # a host name: the agent binds what it resolves to; no address rule
        pass
    lines.append(f"    fib saddr type local {ports} accept")
    if b.clients:
        lines.append(f"    {family} saddr {{ {', '.join(b.clients)} }} {ports} accept")
    lines += [f"    {ports} reject with tcp reset", "  }"]
    return lines


# --- the shell ------------------------------------------------------------------------------


class NetRules:
    """The agent's table: applied when the rules change, deleted on stop."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.applied: str | None = None

    def apply(self, reach: Iterable[Reach], shared: Iterable[int] = (),
              backends: Backends | None = None) -> None:
        script = render(self.table, reach, shared, backends)
        if script == self.applied:
            return
        run(script)
        self.applied = script

    def remove(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True)
        self.applied = None


class Unavailable(Exception):
    """nftables cannot be used here; the message says what is missing."""


def run(script: str) -> None:
    proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Unavailable(f"nft refused the rules: {proc.stderr.strip()[:300]}")


def missing() -> str | None:
    """What this host lacks to confine apps' connections, or None."""
    if os.geteuid() != 0:
        return "agents are not root: apps' connections are not confined (nftables needs root)"
    if shutil.which("nft") is None:
        return ("nft is not installed (Debian package nftables): apps can connect to other "
                "apps' ports and the platform's on this host")
    return None


def for_agent(root: str) -> NetRules | None:
    """The agent's rules, checked usable by applying an empty set (after deleting the
    tables agents killed -9 left); None with a warning."""
    if (reason := missing()) is not None:
        log.warning("no network reach rules on this host: %s", reason)
        return None
    rules = NetRules(table_name(root, os.getpid()))
    try:
        listed = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True,
                                text=True, check=True).stdout
        names = [t["table"]["name"] for t in json.loads(listed).get("nftables", [])
                 if "table" in t and t["table"].get("family") == "inet"]
        for name in stale(names, rules.table, _alive):
            subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True)
        rules.apply([])
    except (Unavailable, subprocess.CalledProcessError, ValueError, KeyError) as exc:
        log.warning("no network reach rules on this host: %s", exc)
        return None
    return rules


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def reach_of(instances: Iterable[tuple[str, int]], addons: Mapping[str, Iterable[str]],
             uids: Mapping[str, int], address: str,
             allowed: frozenset[int] = frozenset()) -> list[Reach]:
    """The Reach of every app of the agent's with a user on this machine (`uids`: app ->
    uid; apps with no instance here too, so their one-off runs are confined): the ports of
    its instances here (`instances`: (app, port)) and of its add-ons (`addons`: where each
    app's add-ons run, from the ledger)."""
    ports: dict[str, set[int]] = {app: set() for app in uids}
    for app, port in instances:
        if app in ports and port:
            ports[app].add(port)
    for app, places in addons.items():
        if app in ports:
            ports[app].update(addon_ports(places, address, allowed))
    return [Reach(uids[app], frozenset(p)) for app, p in ports.items()]


def app_uids(apps: Iterable[str], prefix: str) -> dict[str, int]:
    """The uids of these apps' users (named with the platform's `prefix`) that exist on
    this host."""
    import pwd

    from agents.users import user_name

    by_name = {u.pw_name: u.pw_uid for u in pwd.getpwall()}
    return {app: by_name[n] for app in apps if (n := user_name(app, prefix)) in by_name}
