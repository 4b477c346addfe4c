"""One-off commands (`tally run -a blog -- python manage.py migrate`) on a host agent: in the
app's environment (its release, config vars), as its user; attached (a pty when the caller
has a terminal, pipes otherwise; the output streams back, stdin streams in, the exit code
ends the conversation) or detached (output to the app's logs, listed by `tally ps`).

Only the API starts runs: every request carries a ticket it signed with this host's key
(ledger/tickets.py; the agent learns it when it registers), bound to this host, the app,
the release, the command and the caller, good for 30 s and once. Anything else on the
network or the host (an app's process included) that speaks to this socket is refused
before anything runs.

Wire protocol (ZeroMQ DEALER, the API's relay -> the agent's ROUTER):
    caller: [b"run", json {"ticket", "tty", "rows", "cols"}], then any of
            [b"in", bytes] (stdin), [b"eof", b""], [b"resize", json [rows, cols]],
            [b"signal", b"INT" | b"KILL" | b"HUP" | b"TERM"], [b"alive", b""] every
            KEEPALIVE_S; or alone: [b"stop", json {"ticket"}] (a "stop" ticket: end a run)
    agent:  [b"out", bytes]* then [b"exit", b"<code>"], or [b"error", b"<message>"];
            [b"started", b""] for a detached run, [b"stopped", b""] for a stop;
            [b"alive", b""] every KEEPALIVE_S meanwhile
Each run has its own threads (output, input); they hand frames to the ROUTER's loop over
an inproc PUSH/PULL pair, since a ZeroMQ socket belongs to one thread. The keep-alives let
each side tell a quiet peer (a long migration) from a dead one: the agent hangs up
(SIGHUP) a command whose caller went silent, as a terminal's commands get when the ssh
session drops.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hmac
import json
import logging
import os
import queue
import signal
import struct
import subprocess
import termios
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from agents import logpipe
from agents.processes import Limits, child_setup
from ledger import curve
from ledger.tickets import (
    KEEPALIVE_S,
    SILENCE_S,
    Redeemed,
    Ticket,
    TicketRefused,
    verify,
)

log = logging.getLogger("tally.runs")
SIGNALS = {b"INT": signal.SIGINT, b"KILL": signal.SIGKILL, b"HUP": signal.SIGHUP,
           b"TERM": signal.SIGTERM}
STOP_GRACE_S = 10.0
"""A stopped run gets SIGTERM, then SIGKILL this much later, as an instance does."""
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1

Prepare = Callable[[str, int], tuple[str, dict[str, str], Callable[[], None] | None]]
"""(app, release) -> the run's folder, environment and demotion to the app's user."""
Ended = Callable[[Ticket, int | None, float], None]
"""Called once a run's command exits: its ticket, exit code, seconds it ran."""


class RunError(Exception):
    """The run could not start."""


@dataclass
class Run:
    ticket: Ticket
    proc: subprocess.Popen | None = None
    stdin: queue.Queue[bytes | None] = field(default_factory=queue.Queue)
    """What the caller sent for the command's stdin (None: its end), kept from the first
    byte, which may come while the release is still being prepared."""
    master: int | None = None


class RunServer:
    """The agent's side: a ROUTER bound on `address`, threads per run."""

    def __init__(self, address: str, prepare: Prepare, limits: Limits, key: bytes | None,
                 host_id: str, logs_dir: Path, ended: Ended = lambda t, c, s: None,
                 own: curve.Keypair | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        # A context of its own: its ZAP handler answers for this socket alone.
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # nobody floods the agent's memory
        self.admitted = OnlyTheApi()
        self.auth = curve.serve(self.router, own, self.admitted, self.context) if own else None
        port = self.router.bind_to_random_port(f"tcp://{address}")
        self.endpoint = f"tcp://{address}:{port}"
        self.inbox = f"inproc://runs-{uuid.uuid4().hex}"
        self.pull = self.context.socket(zmq.PULL)
        self.pull.bind(self.inbox)
        self.prepare, self.limits = prepare, limits
        self.key = key
        """This host's key of run tickets; None: no runs. Set by the agent once the API
        gave it (one assignment, read by the loop)."""
        self.host_id, self.logs_dir, self.ended, self.clock = host_id, logs_dir, ended, clock
        self.redeemed = Redeemed(since=clock())
        self.runs: dict[bytes, Run] = {}
        """The attached runs under way, by caller. Shared by the loop and the run threads
        through single dict operations (atomic under the GIL)."""
        self.detached: dict[str, Run] = {}
        """Detached runs under way, by run id."""
        self.heard: dict[bytes, float] = {}
        """When each caller last said anything (the loop's own)."""
        self.thread = threading.Thread(target=self._loop, daemon=True, name="runs")
        self.stop = threading.Event()

    def start(self) -> None:
        self.thread.start()

    def admit(self, key: bytes | None, api_public: bytes | None) -> None:
        """What registering told: this host's key of run tickets, and the API's CURVE public
        key, the one client the run socket admits (None: no runs)."""
        self.key, self.admitted.key = key, api_public

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        if self.auth is not None:
            self.auth.stop()

    def detached_ids(self) -> set[str]:
        """The log names of detached runs under way (their logs must stay until shipped)."""
        return {run_log_name(r.ticket) for r in list(self.detached.values())}

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.pull, zmq.POLLIN)
        next_alive = 0.0
        try:
            while not self.stop.is_set():
                for sock, _ in poller.poll(200):
                    frames = sock.recv_multipart()
                    if sock is self.pull:
                        self.router.send_multipart(frames)
                    elif len(frames) == 3:
                        self._heard(*frames)
                now = time.monotonic()
                if now >= next_alive:
                    self._keep_alive(now)
                    next_alive = now + KEEPALIVE_S
        finally:
            self.router.close()
            self.pull.close()

    def _heard(self, ident: bytes, kind: bytes, data: bytes) -> None:
        run = self.runs.get(ident)
        if kind in (b"run", b"stop"):
            try:
                ticket = self._redeem(data, "run" if kind == b"run" else "stop")
            except TicketRefused as exc:
                log.warning("refused a %s request: %s", kind.decode(), exc)
                self.router.send_multipart([ident, b"error", str(exc).encode()])
                return
            if kind == b"stop":
                self._stop(ident, ticket)
                return
            if run is not None:  # one run per caller socket
                self.router.send_multipart([ident, b"error", b"a run is under way"])
                return
            self.heard[ident] = time.monotonic()
            if not ticket.detached:
                self.runs[ident] = Run(ticket)
            threading.Thread(target=self._run, args=(ident, ticket, _request(data)),
                             daemon=True, name=f"run-{ticket.app}.{ticket.number}").start()
            return
        if run is None:
            return  # nothing of an unknown caller is read, let alone acted on
        self.heard[ident] = time.monotonic()
        if kind == b"in":
            run.stdin.put(data)
        elif kind == b"eof":
            run.stdin.put(None)
        elif kind == b"resize" and run.master is not None:
            with contextlib.suppress(ValueError, OSError, TypeError):
                rows, cols = json.loads(data)
                set_size(run.master, int(rows), int(cols))
        elif kind == b"signal":
            self._signal(run, data)

    def _redeem(self, data: bytes, kind: str) -> Ticket:
        if self.key is None:
            raise TicketRefused("one-off runs are off on this host: it has no key of run "
                                "tickets (not registered yet, or the API has none)")
        try:
            text = str(json.loads(data)["ticket"])
        except (ValueError, TypeError, KeyError) as exc:
            raise TicketRefused("no ticket: runs are started through the API") from exc
        now = self.clock()
        ticket = verify(self.key, text, self.host_id, now)
        if ticket.kind != kind:
            raise TicketRefused(f"a {ticket.kind} ticket does not allow a {kind}")
        self.redeemed.redeem(ticket, now)
        return ticket

    def _run(self, ident: bytes, ticket: Ticket, req: dict) -> None:
        out = self.context.socket(zmq.PUSH)
        out.connect(self.inbox)
        run = self.runs.get(ident) or Run(ticket)
        code: int | None = None
        began = time.monotonic()
        try:
            if not ticket.argv:
                raise RunError("nothing to run: give a command after --")
            cwd, env, demote = self.prepare(ticket.app, ticket.release)
            setup = _hung_up_with_agent(child_setup(self.limits, demote))
            began = time.monotonic()
            def send(kind: bytes, data: bytes = b"") -> None:
                out.send_multipart([ident, kind, data])

            if ticket.detached:
                self.detached[ticket.run_id] = run
                code = self._detached(run, cwd, env, setup, lambda: send(b"started"))
            else:
                code = run_attached(run, cwd, env, setup, bool(req.get("tty")),
                                    (req.get("rows"), req.get("cols")),
                                    lambda data: send(b"out", data))
                out.send_multipart([ident, b"exit", str(code).encode()])
        except Exception as exc:  # the caller gets the reason, the agent carries on
            log.info("run %s.%s refused: %s", ticket.app, ticket.number, exc)
            out.send_multipart([ident, b"error", str(exc).encode()])
        finally:
            self.runs.pop(ident, None)
            self.detached.pop(ticket.run_id, None)
            out.close(linger=5000)
            try:
                self.ended(ticket, code, time.monotonic() - began)
            except Exception:  # recorded or not, the run is over
                log.exception("could not record the end of run %s.%s", ticket.app,
                              ticket.number)

    def _detached(self, run: Run, cwd: str, env: dict[str, str], setup: Callable[[], None],
                  started: Callable[[], None]) -> int:
        """Run with its output appended to a log the shipper sends to the app's logs."""
        path = self.logs_dir / f"{run_log_name(run.ticket)}.log"
        write, relay = logpipe.start(path)  # its output through a relay (agents/logpipe.py)
        try:
            run.proc = subprocess.Popen(list(run.ticket.argv), cwd=cwd, env=env,
                                        stdin=subprocess.DEVNULL, stdout=write, stderr=write,
                                        start_new_session=True, preexec_fn=setup)
        except OSError as exc:
            os.close(write)
            logpipe.wait_gone(relay.pid, relay)
            raise RunError(f"cannot start {run.ticket.argv[0]!r}: {exc.strerror}") from exc
        os.close(write)  # the relay's end of file: when the run's processes are gone
        started()
        code = _code(run.proc.wait())
        logpipe.wait_gone(relay.pid, relay)
        return code

    def _stop(self, ident: bytes, ticket: Ticket) -> None:
        """End a run (detached or attached) with SIGTERM, then SIGKILL after a grace."""
        run = self.detached.get(ticket.run_id) or next(
            (r for r in list(self.runs.values()) if r.ticket.run_id == ticket.run_id), None)
        if run is None or run.proc is None:
            self.router.send_multipart([ident, b"error", b"no such run under way here"])
            return
        self._signal(run, b"TERM")
        proc = run.proc

        def kill_later() -> None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_GRACE_S)
                return
            self._signal(run, b"KILL")
        threading.Thread(target=kill_later, daemon=True).start()
        self.router.send_multipart([ident, b"stopped", b""])

    def _keep_alive(self, now: float) -> None:
        """Tell every caller we are here; hang up the command of one gone silent."""
        for ident in set(self.heard) - set(self.runs):
            del self.heard[ident]  # its run ended
        for ident, run in list(self.runs.items()):
            self.router.send_multipart([ident, b"alive", b""])
            if now - self.heard.get(ident, now) > SILENCE_S and self._signal(run, b"HUP"):
                log.info("a run's caller went silent: its command was hung up")
                self.heard[ident] = float("inf")  # once

    def _signal(self, run: Run, name: bytes) -> bool:
        """Signal a run's process group (its session); False if it has not started yet."""
        sig = SIGNALS.get(name)
        if run.proc is None or sig is None:
            return False
        with contextlib.suppress(ProcessLookupError):  # it ended: its exit is coming
            os.killpg(run.proc.pid, sig)
        return True


class OnlyTheApi:
    """The run socket's ZAP credentials provider: only the API's CURVE key may connect
    (learnt when the host registers). Anything else on the network or the host gets no
    ZMTP session at all, let alone a hearing for a ticket."""

    def __init__(self) -> None:
        self.key: bytes | None = None

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = self.key is not None and hmac.compare_digest(key, self.key)
        if not allowed:
            log.warning("refused a run socket client with key %s", key[:8].decode())
        return allowed


def run_log_name(ticket: Ticket) -> str:
    """A detached run's log, `<app>.run.<N>`: the collector files it under the app."""
    return f"{ticket.app}.run.{ticket.number}"


def _request(data: bytes) -> dict:
    with contextlib.suppress(ValueError):
        req = json.loads(data)
        if isinstance(req, dict):
            return req
    return {}


def _hung_up_with_agent(setup: Callable[[], None]) -> Callable[[], None]:
    """The child's setup, then: SIGHUP when the agent dies, as a terminal's commands get
    when it closes (the run's pty goes with the agent, and nobody could stop it otherwise).
    Set after the demotion, which clears it."""
    agent = os.getpid()

    def setup_then_die_with_agent() -> None:
        setup()
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGHUP)
        if os.getppid() != agent:  # the agent died before prctl: hang up now
            os.kill(os.getpid(), signal.SIGHUP)

    return setup_then_die_with_agent


def _with_terminal(setup: Callable[[], None]) -> Callable[[], None]:
    """Make the pty on stdin the new session's controlling terminal first, so Ctrl-C and
    Ctrl-Z typed into it signal the command as on a local terminal."""
    def setup_with_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        setup()

    return setup_with_terminal


def set_size(fd: int, rows: int, cols: int) -> None:
    """The terminal's size (the kernel tells its foreground processes: SIGWINCH)."""
    if 0 < rows < 10000 and 0 < cols < 10000:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def run_attached(run: Run, cwd: str, env: dict[str, str], setup: Callable[[], None],
                 tty: bool, size: tuple[int | None, int | None],
                 emit: Callable[[bytes], None]) -> int:
    """Run the ticket's command with a pty as its terminal (tty) or pipes; hand its output
    to `emit`, feed it what arrives in `run.stdin`; its exit code (128 + n when killed by
    signal n, as a shell says)."""
    argv = list(run.ticket.argv)
    if tty:
        master, slave = os.openpty()
        with contextlib.suppress(TypeError, ValueError, OSError):
            set_size(master, int(size[0] or 24), int(size[1] or 80))
        stdio: dict = {"stdin": slave, "stdout": slave, "stderr": slave}
        setup = _with_terminal(setup)
    else:
        stdio = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE,
                 "stderr": subprocess.STDOUT}
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, start_new_session=True,
                                preexec_fn=setup, **stdio)
    except OSError as exc:
        if tty:
            os.close(master)
        raise RunError(f"cannot start {argv[0]!r}: {exc.strerror}") from exc
    finally:
        if tty:
            os.close(slave)
    if tty:
        reader, writer = master, os.dup(master)
        run.master = master
    else:
        assert proc.stdout is not None and proc.stdin is not None
        reader, writer = proc.stdout.fileno(), os.dup(proc.stdin.fileno())
        proc.stdin.close()  # the feeder's copy is the command's only way in
    run.proc = proc
    feeder = threading.Thread(target=_feed, args=(run.stdin, writer, tty), daemon=True)
    feeder.start()
    try:
        while True:
            try:
                data = os.read(reader, 65536)
            except OSError:  # EIO: every holder of the pty closed it
                break
            if not data:
                break
            emit(data)
    finally:
        code = _code(proc.wait())
        run.stdin.put(None)
        run.master = None
        feeder.join(1)
        if tty:
            os.close(master)
        elif proc.stdout is not None:
            proc.stdout.close()
    return code


def _feed(inbox: queue.Queue[bytes | None], fd: int, tty: bool) -> None:
    """Write what the caller types (or pipes) to the command; at the end of it, a pty gets
    Ctrl-D (the terminal's end of input), a pipe is closed."""
    try:
        while (data := inbox.get()) is not None:
            os.write(fd, data)
        if tty:
            os.write(fd, b"\x04")
    except OSError:  # the command is gone
        pass
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _code(code: int) -> int:
    return code if code >= 0 else 128 - code
