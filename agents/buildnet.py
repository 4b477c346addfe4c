"""What a build may connect to: the package index (HTTP and HTTPS to the addresses its
hosts resolve to), and DNS to the resolvers to find it. Nothing else: not this host
(the ledger, the API, agents' ports, apps), not the LAN, not a cloud's metadata service.

Enforced as apps' reach is (agents/netrules.py): nftables in the output hook, matching
the connecting socket's owner (`meta skuid`: each app builds as its own build uid), in a
table of the builder's own, replaced atomically (`nft -f`) whenever a build uid or an
index address is added, deleted when the builder stops (and by the next builder if it
was killed -9). The index's hosts are resolved on the builder before each build; a CDN
answering a build with an address the builder was not given makes that download fail
(the build is then retried by the app's next deploy), never pass.

What this cannot stop: a build still shares the host's network namespace, so abstract
Unix sockets (bound in no file) are reachable; the mount namespace hides every socket
file of the host.
"""

from __future__ import annotations

import configparser
import contextlib
import ipaddress
import json
import logging
import os
import re
import socket
import subprocess
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from agents import netrules

log = logging.getLogger("tally.builder")
DEFAULT_INDEX_HOSTS = ("pypi.org", "files.pythonhosted.org")
"""PyPI's pages and its files: where pip, uv and Poetry fetch from by default."""
INDEX_KEYS = ("index-url", "extra-index-url", "index_url", "extra_index_url")
INDEX_VARS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "UV_INDEX_URL", "UV_EXTRA_INDEX_URL")
WEB_PORTS = (80, 443)


def index_hosts(env: dict[str, str], configs: Iterable[Path] = (),
                extra: Iterable[str] = ()) -> list[str]:
    """The hosts builds may fetch from: PyPI's, those of the index URLs pip is configured
    with (its environment and its configuration files), and `extra` (--index-host)."""
    urls = [v for k, v in env.items() if k in INDEX_VARS]
    for conf in configs:
        parser = configparser.ConfigParser(interpolation=None)
        with contextlib.suppress(OSError, configparser.Error):
            parser.read(conf)
            urls += [v for s in parser.sections() for k, v in parser[s].items()
                     if k in INDEX_KEYS]
    hosts = set(DEFAULT_INDEX_HOSTS) | set(extra)
    for value in urls:
        for word in value.split():
            url = urlsplit(word)
            if url.scheme in ("http", "https") and url.hostname:
                hosts.add(url.hostname)
    return sorted(hosts)


def resolvers(resolv_conf: str) -> list[str]:
    """The name servers of a resolv.conf."""
    out = []
    for line in resolv_conf.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            with contextlib.suppress(ValueError):
                out.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
    return out


@dataclass
class Allowed:
    """Who is confined (build uids) and where they may go."""

    uids: set[int] = field(default_factory=set)
    index: set[str] = field(default_factory=set)
    """Addresses of the index's hosts (IPv4 and IPv6)."""
    dns: set[str] = field(default_factory=set)


def render(table: str, allowed: Allowed) -> str:
    """The nft script that replaces `table` with the builds' rules, atomically (pure)."""
    lines = [f"table inet {table} {{}}", f"delete table inet {table}",
             f"table inet {table} {{", "  chain output {",
             "    type filter hook output priority 0; policy accept;"]
    if allowed.uids:
        who = f"meta skuid {{ {', '.join(str(u) for u in sorted(allowed.uids))} }}"
        web = ", ".join(str(p) for p in WEB_PORTS)
        lines.append(f"    {who} ct state established,related accept")
        for family, proto in (("ip", 4), ("ip6", 6)):
            dns = sorted(a for a in allowed.dns if ipaddress.ip_address(a).version == proto)
            index = sorted(a for a in allowed.index if ipaddress.ip_address(a).version == proto)
            if dns:
                lines.append(f"    {who} {family} daddr {{ {', '.join(dns)} }} "
                             "meta l4proto { tcp, udp } th dport 53 accept")
            if index:
                lines.append(f"    {who} {family} daddr {{ {', '.join(index)} }} "
                             f"tcp dport {{ {web} }} accept")
        lines.append(f"    {who} reject")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def resolve(hosts: Iterable[str]) -> set[str]:
    """Every address the hosts resolve to now (those that do not resolve: none)."""
    out: set[str] = set()
    for host in hosts:
        with contextlib.suppress(OSError, UnicodeError):
            for info in socket.getaddrinfo(host, 443, proto=socket.IPPROTO_TCP):
                out.add(str(ipaddress.ip_address(info[4][0])))
    return out


class BuildNet:
    """The builder's table: a build uid is confined before its build starts."""

    def __init__(self, table: str, hosts: list[str], dns: list[str]) -> None:
        self.table, self.hosts = table, hosts
        self.allowed = Allowed(dns=set(dns))
        self.applied: str | None = None

    def confine(self, uid: int) -> None:
        """Confine `uid` to the index (its addresses resolved again now). The table is
        checked to be there first: a flushed ruleset must not leave builds unconfined."""
        self.allowed.uids.add(uid)
        self.allowed.index |= resolve(self.hosts)
        script = render(self.table, self.allowed)
        there = subprocess.run(["nft", "list", "table", "inet", self.table],
                               capture_output=True).returncode == 0
        if script != self.applied or not there:
            netrules.run(script)
            self.applied = script

    def remove(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True)
        self.applied = None


def for_builder(hosts: list[str]) -> BuildNet:
    """The builder's rules, checked usable by applying them empty (after deleting the
    tables dead builders left); netrules.Unavailable saying why they cannot be (the builder
    then builds nothing rather than on the host's whole network)."""
    if (reason := netrules.missing()) is not None:
        raise netrules.Unavailable(reason)
    table = f"tally_builds_{uuid.uuid4().hex[:8]}_p{os.getpid()}"
    try:
        dns = resolvers(Path("/etc/resolv.conf").read_text())
    except OSError:
        dns = []
    net = BuildNet(table, hosts, dns)
    try:
        listed = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True,
                                text=True, check=True).stdout
        names = [t["table"]["name"] for t in json.loads(listed).get("nftables", [])
                 if "table" in t and t["table"].get("family") == "inet"]
        for name in names:
            match = re.fullmatch(r"tally_builds_[0-9a-f]{8}_p(\d+)", name)
            if match and not psutil.pid_exists(int(match[1])):
                subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True)
        netrules.run(render(table, net.allowed))
    except (subprocess.CalledProcessError, ValueError, KeyError) as exc:
        raise netrules.Unavailable(str(exc)) from exc
    return net
