"""The agent's port range is the agent's: apps listen where the agent says, and no app can
squat another's port.

The agent holds every free port of its range, as root: a socket bound to `address:port`,
not listening, without SO_REUSEADDR (set for the bind itself, to pass TIME_WAIT, then
cleared). While it holds one, no app can bind that port, on that address or the wildcard,
SO_REUSEADDR or not; and connecting to it is refused, as to a free port. A gunicorn
command (any process type) is handed the socket of its port itself (`--bind fd://N`, every
`--bind` of its Procfile command removed) and listens on it: there is no moment when the
port is free. The agent then closes its copy, so the instance's death closes the port as
before (a balancer's connection is refused, not left waiting), and holds it again as soon
as it sees the exit. An app that binds every port it can gets none of the range, and
another tenant's new instance never meets `Address already in use`. A port found taken
when an instance needs it (an app that won the moment between an instance's death and the
agent's next look) is taken back: the squatting app process is killed (`evict`).

A web command that is not gunicorn binds $PORT itself: its port is taken back from any
squatter and held until just before it starts, then let go. No other app can take it in
that moment: the kernel refuses a bind to a port of the range to every uid but root and
the app placed there (agents/binds.py, set before the port is let go). Where that rule is
unavailable (not root, no cgroup v2 mount), another app may take it; it gains nothing
(agents/netrules.py: a SYN-ACK from an instance's port leaves only from a socket of that
instance's app, and connections reach the range only at the agent's address), and it is
evicted at the instance's next start. `rebind` is pure; `Holder` is the shell.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import shlex
import socket
from dataclasses import dataclass

import psutil

log = logging.getLogger("tally.agent")

GUNICORN = re.compile(r"^(\S*/)?gunicorn$")
PYTHON = re.compile(r"^(\S*/)?python[0-9.]*$")
ENV_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
BIND_OPTION = re.compile(r"(?<!\S)(?:--bind(?:=|\s+)|-b\s*)\S+\s*")


def rebind(command: str) -> str | None:
    """The command without its gunicorn `-b/--bind` options (the agent binds it), or None
    if it is not a gunicorn command (it binds $PORT itself). The rest stays as written
    (`$WEB_CONCURRENCY` is still the shell's to expand)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    while words and ENV_WORD.match(words[0]):
        words = words[1:]
    if words[:1] and GUNICORN.match(words[0]) or (
            len(words) >= 3 and PYTHON.match(words[0]) and words[1:3] == ["-m", "gunicorn"]):
        return BIND_OPTION.sub("", command).strip()
    return None


def strip_binds(args: str) -> str:
    """gunicorn options (an app's GUNICORN_CMD_ARGS) without `-b/--bind`."""
    return BIND_OPTION.sub("", args).strip()


@dataclass(frozen=True)
class Binding:
    """How the agent starts a web instance on its port."""

    command: str
    gunicorn_bind: str
    """The `--bind` for GUNICORN_CMD_ARGS."""
    pass_fds: tuple[int, ...]


class Holder:
    """The listening sockets the agent holds on its range."""

    def __init__(self, address: str, low: int, high: int) -> None:
        self.address, self.low, self.high = address, low, high
        self.held: dict[int, socket.socket] = {}
        self.let_go: set[int] = set()
        """Ports given to a running instance (its socket, or to bind itself): not held
        again until it exits (`hold`)."""

    def hold_free(self) -> None:
        """Hold every port of the range not held yet and free now (one in use by an
        instance a previous agent started stays with it)."""
        for port in range(self.low, self.high + 1):
            if port not in self.held and port not in self.let_go:
                self.hold(port)

    def hold(self, port: int) -> socket.socket | None:
        """Hold the port (again: its instance exited), if no one has it."""
        self.let_go.discard(port)
        if port in self.held:
            return self.held[port]
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
            sock.bind((self.address, port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)  # then: no one else
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            return None
        self.held[port] = sock
        return sock

    def binding(self, process_type: str, command: str, port: int, apps: set[int]) -> Binding:
        """A gunicorn command (of any process type) gets the held socket of its port, its
        own binds removed (call `handed` once it started); another web command gets its
        port let go (it binds $PORT itself); the port of any other process stays held. A
        port some process of an app (`apps`: their uids) took meanwhile is taken back
        first, for either kind of web command."""
        gunicorn = rebind(command)
        if gunicorn is None and process_type != "web":
            return Binding(command, f"--bind {self.address}:{port}", ())
        sock = self.hold(port)  # a web command binding $PORT itself gets it free too
        if sock is None and evict(port, apps):
            sock = self.hold(port)
        if gunicorn is None or sock is None:
            self.release(port)
            self.let_go.add(port)
            return Binding(gunicorn or command, f"--bind {self.address}:{port}", ())
        return Binding(gunicorn, f"--bind fd://{sock.fileno()}", (sock.fileno(),))

    def handed(self, port: int, bound: Binding) -> None:
        """The instance has started: if it has its socket, close ours, so its death frees
        the port at once (the agent holds it again when it sees the exit)."""
        if not bound.pass_fds:
            return
        self.release(port)
        self.let_go.add(port)  # not ours to bind while it runs (it may not listen yet)

    def release(self, port: int) -> None:
        """Let the port go (for a web command that binds $PORT itself)."""
        sock = self.held.pop(port, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for sock in self.held.values():
            with contextlib.suppress(OSError):
                sock.close()
        self.held.clear()


def evict(port: int, apps: set[int]) -> bool:
    """Kill the app processes (by uid: never root's, never another platform's) listening on
    `port`; whether there were any."""
    found = False
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN \
                and conn.pid:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(conn.pid)
                if proc.uids().real in apps:
                    log.warning("port %s of our range is taken by pid %s (uid %s): killed",
                                port, conn.pid, proc.uids().real)
                    proc.kill()
                    proc.wait(2)
                    found = True
    return found
