"""One-off commands (`tally run APP -- python manage.py migrate`): run on a host, in the
app's environment (its serving release, virtualenv, config vars), as its user, in a pty;
the output streams back and the exit code ends the conversation.

Wire protocol (ZeroMQ DEALER -> the agent's ROUTER):
    client: [b"run", json {"app", "argv"}], then [b"alive", b""] every KEEPALIVE_S,
            and maybe [b"signal", b"INT" | b"KILL"]
    agent:  [b"out", bytes]* then [b"exit", b"<code>"], or [b"error", b"<message>"];
            [b"alive", b""] every KEEPALIVE_S meanwhile
Each run has its own thread; threads hand frames to the ROUTER's loop over an inproc
PUSH/PULL pair, since a ZeroMQ socket belongs to one thread. The keep-alives let each
side tell a quiet peer (a long migration) from a dead one or a lost network: the CLI
gives up with a clear error instead of hanging, and the agent hangs up (SIGHUP) a
command whose caller went silent, as a terminal's commands get when the ssh session
drops. Ctrl-C in the CLI stops the command on the host (a second one kills it), as
`heroku run` does.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from typing import BinaryIO

import zmq

from agents.processes import Limits, child_setup

log = logging.getLogger("tally.runs")
KEEPALIVE_S = 1.0
"""While a run prepares (maybe a pip install) or runs, each side says "alive" this often."""
SILENCE_S = 10.0
"""Either side gives up on a peer it has not heard from for this long."""
SIGNALS = {b"INT": signal.SIGINT, b"KILL": signal.SIGKILL, b"HUP": signal.SIGHUP}
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


class RunError(Exception):
    """The run could not start, or the agent did not answer."""


class RunServer:
    """The agent's side: a ROUTER bound on `address`, a thread per run."""

    def __init__(self, address: str,
                 prepare: Callable[[str], tuple[str, dict[str, str], Callable[[], None] | None]],
                 limits: Limits,
                 context: zmq.Context | None = None) -> None:
        self.context = context or zmq.Context.instance()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        port = self.router.bind_to_random_port(f"tcp://{address}")
        self.endpoint = f"tcp://{address}:{port}"
        self.inbox = f"inproc://runs-{uuid.uuid4().hex}"
        self.pull = self.context.socket(zmq.PULL)
        self.pull.bind(self.inbox)
        self.prepare, self.limits = prepare, limits
        self.runs: dict[bytes, subprocess.Popen | None] = {}
        """The runs under way, by caller: their command once started. Shared by the loop
        and the run threads through single dict operations (atomic under the GIL)."""
        self.heard: dict[bytes, float] = {}
        """When each caller last said anything (the loop's own)."""
        self.thread = threading.Thread(target=self._loop, daemon=True, name="runs")
        self.stop = threading.Event()

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)

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
                        continue
                    if len(frames) != 3:
                        continue
                    self.heard[frames[0]] = time.monotonic()
                    if frames[1] == b"run":
                        self.runs[frames[0]] = None
                        threading.Thread(target=self._run, args=(frames[0], frames[2]),
                                         daemon=True).start()
                    elif frames[1] == b"signal":
                        self._signal(frames[0], frames[2])
                now = time.monotonic()
                if now >= next_alive:
                    self._keep_alive(now)
                    next_alive = now + KEEPALIVE_S
        finally:
            self.router.close()
            self.pull.close()

    def _run(self, ident: bytes, body: bytes) -> None:
        out = self.context.socket(zmq.PUSH)
        out.connect(self.inbox)
        try:
            req = json.loads(body)
            argv = [str(a) for a in req["argv"]]
            if not argv:
                raise RunError("nothing to run: give a command after --")
            cwd, env, demote = self.prepare(str(req["app"]))
            setup = _hung_up_with_agent(child_setup(self.limits, demote))
            code = run_in_pty(argv, cwd, env, setup,
                              lambda data: out.send_multipart([ident, b"out", data]),
                              lambda proc: self.runs.update({ident: proc}))
            out.send_multipart([ident, b"exit", str(code).encode()])
        except Exception as exc:  # the caller gets the reason, the agent carries on
            log.info("run refused: %s", exc)
            out.send_multipart([ident, b"error", str(exc).encode()])
        finally:
            self.runs.pop(ident, None)
            out.close(linger=5000)

    def _keep_alive(self, now: float) -> None:
        """Tell every caller we are here; hang up the command of one gone silent."""
        for ident in set(self.heard) - set(self.runs):
            del self.heard[ident]  # its run ended
        for ident in list(self.runs):
            self.router.send_multipart([ident, b"alive", b""])
            if now - self.heard.get(ident, now) > SILENCE_S and self._signal(ident, b"HUP"):
                log.info("a run's caller went silent: its command was hung up")
                self.heard[ident] = float("inf")  # once

    def _signal(self, ident: bytes, name: bytes) -> bool:
        """Signal a caller's command's process group (its session); False if it has not
        started yet."""
        proc, sig = self.runs.get(ident), SIGNALS.get(name)
        if proc is None or sig is None:
            return False
        with contextlib.suppress(ProcessLookupError):  # it ended: its exit is coming
            os.killpg(proc.pid, sig)
        return True


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


def run_in_pty(argv: list[str], cwd: str, env: dict[str, str], setup: Callable[[], None],
               emit: Callable[[bytes], None],
               started: Callable[[subprocess.Popen], None] = lambda proc: None) -> int:
    """Run `argv` with a pty as its terminal; hand its output to `emit` (and the process,
    once started, to `started`); its exit code (128 + n when killed by signal n, as a shell
    says)."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave,
                                stderr=slave, start_new_session=True, preexec_fn=setup)
    except OSError as exc:
        os.close(master)
        raise RunError(f"cannot start {argv[0]!r}: {exc.strerror}") from exc
    finally:
        os.close(slave)
    started(proc)
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the pty closed it
                break
            if not data:
                break
            emit(data)
    finally:
        os.close(master)
    code = proc.wait()
    return code if code >= 0 else 128 - code


def run_remote(endpoint: str, app: str, argv: list[str], out: BinaryIO,
               context: zmq.Context | None = None) -> int:
    """The CLI's side: ask the agent at `endpoint` to run `argv`; copy the output to `out`;
    return the command's exit code. Ctrl-C asks the agent to interrupt the command, a
    second one to kill it, a third leaves at once."""
    sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)  # a last signal still goes out as we leave
    sock.connect(endpoint)
    interrupts = 0
    try:
        sock.send_multipart([b"run", json.dumps({"app": app, "argv": argv}).encode()])
        heard = said = time.monotonic()
        while True:
            try:
                now = time.monotonic()
                if now - said >= KEEPALIVE_S:
                    sock.send_multipart([b"alive", b""])
                    said = now
                if not sock.poll(int(KEEPALIVE_S * 1000)):
                    if time.monotonic() - heard > SILENCE_S:
                        raise RunError(f"lost the agent at {endpoint}: not a word for "
                                       f"{SILENCE_S:.0f} s; the command may still be "
                                       f"running there")
                    continue
                heard = time.monotonic()
                kind, data = sock.recv_multipart()
                if kind == b"out":
                    out.write(data)
                    out.flush()
                elif kind == b"exit":
                    return int(data)
                elif kind == b"error":
                    raise RunError(data.decode("utf-8", "replace"))
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts > 2:
                    raise
                sock.send_multipart([b"signal", b"INT" if interrupts == 1 else b"KILL"])
    finally:
        sock.close()
