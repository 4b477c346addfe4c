"""The CLI's end of an attached one-off run (`tally run`): a WebSocket to the API, which
relays it to the host agent (api/relay.py has the message format).

As ssh does: with a terminal on stdin, the command gets a pty of the same size (resizes
follow, SIGWINCH), and the local terminal is raw, so Ctrl-C, Ctrl-D and Ctrl-Z are keys
for the remote terminal; without one (a pipe, a file), stdin is streamed and its end
closes the command's input, and Ctrl-C interrupts the command (a second one kills it, a
third leaves). Both sides say "alive" every second: silence past SILENCE_S means the
API or the agent is gone, and the CLI says so instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import termios
import threading
import time
import tty as ttymode
from collections.abc import Iterator
from typing import BinaryIO

import requests
from simple_websocket import Client, ConnectionClosed
from simple_websocket.errors import ConnectionError as WsConnectionError

from ledger.tickets import KEEPALIVE_S, RELAYS_FULL, SILENCE_S

API_SILENCE_S = SILENCE_S + 5
"""The API relays the agent's keep-alives and says when it lost the agent (after
SILENCE_S); the CLI gives up on the API itself a little later, so the API speaks first."""


class RunError(Exception):
    """The run could not go on; the message says why."""


def terminal_size(fd: int) -> tuple[int, int] | None:
    with contextlib.suppress(OSError):
        size = os.get_terminal_size(fd)
        return size.lines, size.columns
    return None


def ws_url(api: str, path: str, query: str) -> str:
    scheme, _, rest = api.partition("://")
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest.rstrip('/')}{path}?{query}"


def refusal(api: str, path: str, headers: dict[str, str], status: int | None) -> str:
    """Why the API refused the WebSocket: it checks a plain GET the same way, and answers
    it with the reason as JSON; but a 503 is a full API process, which it has recorded as
    the run's end (another process might answer the GET, and not be full)."""
    if status == 503:
        return f"cannot attach to the run: {RELAYS_FULL} (HTTP 503)"
    try:
        r = requests.get(api + path, headers=headers, timeout=30)
        message = r.json()["message"]
    except (requests.RequestException, ValueError, KeyError):
        message = "refused"
    return f"cannot attach to the run: {message} (HTTP {status})"


class Session:
    """One attached run: sends are serialised (stdin's thread, keep-alives, resizes)."""

    def __init__(self, ws: Client) -> None:
        self.ws = ws
        self.lock = threading.Lock()
        self.resized = threading.Event()

    def send(self, data: str | bytes) -> None:
        with self.lock:
            self.ws.send(data)

    def control(self, kind: str, **fields: object) -> None:
        self.send(json.dumps({"type": kind, **fields}))


def attach(api: str, token: str | None, path: str, stdin: int, out: BinaryIO,
           tty: bool) -> int:
    """Attach to the run at `path` (from POST /apps/NAME/runs); its exit code. RunError
    when the API or the agent refuses or goes silent."""
    size = terminal_size(stdin) if tty else None
    query = f"tty={int(tty)}" + (f"&rows={size[0]}&cols={size[1]}" if size else "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        ws = Client.connect(ws_url(api, path, query), headers=headers)
    except WsConnectionError as exc:  # refused: the same request without the upgrade
        raise RunError(refusal(api, path, headers, exc.status_code)) from exc  # says why
    except OSError as exc:
        raise RunError(f"cannot attach to the run through {api}: {exc}") from exc
    session = Session(ws)
    local = tty and os.isatty(stdin)  # -t with a pipe: a remote pty, nothing local to set
    with _raw(stdin, local), _on_resize(session, local):
        threading.Thread(target=_pump_stdin, args=(session, stdin), daemon=True).start()
        try:
            return _converse(session, stdin, out, tty)
        finally:
            with contextlib.suppress(Exception):
                ws.close()


def _converse(session: Session, stdin: int, out: BinaryIO, tty: bool) -> int:
    heard = said = time.monotonic()
    interrupts = 0
    while True:
        try:
            now = time.monotonic()
            if now - said >= KEEPALIVE_S:
                session.control("alive")
                said = now
            if session.resized.is_set():
                session.resized.clear()
                if size := terminal_size(stdin):
                    session.control("resize", rows=size[0], cols=size[1])
            msg = session.ws.receive(timeout=0.2)
            if msg is None:
                if time.monotonic() - heard > API_SILENCE_S:
                    raise RunError(f"lost the API: not a word for {API_SILENCE_S:.0f} s; the "
                                   f"command may still be running on its host")
                continue
            heard = time.monotonic()
            if isinstance(msg, bytes):
                out.write(msg)
                out.flush()
                continue
            m = json.loads(msg)
            if m.get("type") == "exit":
                return int(m["code"])
            if m.get("type") == "error":
                raise RunError(str(m.get("message")))
        except ConnectionClosed as exc:
            raise RunError("the API closed the run's connection (its agent was lost, or "
                           "the API restarted); the command may still be running") from exc
        except KeyboardInterrupt:  # only without a terminal: raw mode sends Ctrl-C as a key
            interrupts += 1
            if interrupts > 2:
                raise
            session.control("signal", name="INT" if interrupts == 1 else "KILL")


def _pump_stdin(session: Session, stdin: int) -> None:
    """Everything read from stdin goes to the command; its end is said once."""
    try:
        while data := os.read(stdin, 65536):
            session.send(data)
        session.control("eof")
    except (OSError, ConnectionClosed):
        pass


@contextlib.contextmanager
def _raw(fd: int, tty: bool) -> Iterator[None]:
    """The local terminal in raw mode for the run's length (keys go to the remote one)."""
    if not tty:
        yield
        return
    saved = termios.tcgetattr(fd)
    ttymode.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _on_resize(session: Session, tty: bool) -> Iterator[None]:
    """SIGWINCH marks a resize; the conversation loop sends the new size."""
    if not tty:
        yield
        return
    old = signal.signal(signal.SIGWINCH, lambda *_: session.resized.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, old)
