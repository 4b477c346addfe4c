"""One-off commands (`tally run APP -- python manage.py migrate`): run on a host, in the
app's environment (its serving release, virtualenv, config vars), as its user, in a pty;
the output streams back and the exit code ends the conversation.

Wire protocol (ZeroMQ DEALER -> the agent's ROUTER):
    client: [b"run", json {"app", "argv"}]
    agent:  [b"out", bytes]* then [b"exit", b"<code>"], or [b"error", b"<message>"]
Each run has its own thread; threads hand frames to the ROUTER's loop over an inproc
PUSH/PULL pair, since a ZeroMQ socket belongs to one thread.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import uuid
from collections.abc import Callable
from typing import BinaryIO

import zmq

from agents.processes import Limits, child_setup

log = logging.getLogger("tally.runs")
FIRST_ANSWER_S = 120.0
"""A run prepares the release (maybe a pip install) before its first byte."""


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
        try:
            while not self.stop.is_set():
                for sock, _ in poller.poll(200):
                    frames = sock.recv_multipart()
                    if sock is self.pull:
                        self.router.send_multipart(frames)
                    elif len(frames) == 3 and frames[1] == b"run":
                        threading.Thread(target=self._run, args=(frames[0], frames[2]),
                                         daemon=True).start()
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
            code = run_in_pty(argv, cwd, env, child_setup(self.limits, demote),
                              lambda data: out.send_multipart([ident, b"out", data]))
            out.send_multipart([ident, b"exit", str(code).encode()])
        except Exception as exc:  # the caller gets the reason, the agent carries on
            log.info("run refused: %s", exc)
            out.send_multipart([ident, b"error", str(exc).encode()])
        finally:
            out.close(linger=5000)


def run_in_pty(argv: list[str], cwd: str, env: dict[str, str], setup: Callable[[], None],
               emit: Callable[[bytes], None]) -> int:
    """Run `argv` with a pty as its terminal; hand its output to `emit`; its exit code
    (128 + n when killed by signal n, as a shell says)."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave,
                                stderr=slave, start_new_session=True, preexec_fn=setup)
    except OSError as exc:
        os.close(master)
        raise RunError(f"cannot start {argv[0]!r}: {exc.strerror}") from exc
    finally:
        os.close(slave)
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
    return the command's exit code."""
    sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"run", json.dumps({"app": app, "argv": argv}).encode()])
        if not sock.poll(int(FIRST_ANSWER_S * 1000)):
            raise RunError(f"no answer from the agent at {endpoint}")
        while True:
            kind, data = sock.recv_multipart()
            if kind == b"out":
                out.write(data)
                out.flush()
            elif kind == b"exit":
                return int(data)
            elif kind == b"error":
                raise RunError(data.decode("utf-8", "replace"))
    finally:
        sock.close()
