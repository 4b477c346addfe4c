"""The API's side of a one-off run: a WebSocket to the CLI (simple-websocket, on gunicorn's
threaded workers: the handler thread owns the connection) and a ZeroMQ DEALER, over CURVE,
to the host agent's run socket, with the ticket. Bytes go both ways; the keep-alives go through, so
each end's silence rules (ledger/tickets.py KEEPALIVE_S, SILENCE_S) hold end to end.

WebSocket messages, CLI -> API: binary = stdin bytes; text = JSON {"type": "alive" | "eof"
| "resize" (rows, cols) | "signal" (name: INT, KILL)}. API -> CLI: binary = output; text =
JSON {"type": "alive" | "exit" (code) | "error" (message)}.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq
from flask import Response, request
from simple_websocket import ConnectionClosed, Server

from ledger import curve
from ledger.tickets import KEEPALIVE_S, SILENCE_S, channel_seed

AGENT_ANSWER_S = 60.0
"""How long a detached start or a stop waits for the agent (a start may unpack a release)."""


class AgentSilent(Exception):
    """The agent did not answer in time."""


@functools.lru_cache(maxsize=4)
def run_channel(master: bytes) -> curve.Keypair:
    """The API's CURVE keypair on the run channel, derived from the platform's run key: the
    same in every API process, and the only client key agents admit."""
    return curve.from_seed(channel_seed(master))


def _dealer(ctx: zmq.Context, endpoint: str, keys: curve.Client) -> zmq.Socket:
    """A DEALER to an agent's run socket, over CURVE (the agent's registered public key,
    the API's channel keypair): the terminal's bytes are encrypted, and only the API's
    key is admitted."""
    sock = ctx.socket(zmq.DEALER)
    curve.as_client(sock, keys)
    sock.connect(endpoint)
    return sock


def is_websocket() -> bool:
    return (request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower())


def accept() -> Server:
    """Complete the WebSocket handshake on this request's socket."""
    return Server(request.environ, max_message_size=1 << 20)


class Hijacked(Response):
    """What a WebSocket view returns: the connection is the handler's, so gunicorn must
    write nothing more (it closes the connection on StopIteration); under werkzeug's
    server, the empty response it expects."""

    def __init__(self, ws: Server) -> None:
        super().__init__()
        self.ws = ws

    def __call__(self, environ: Any, start_response: Any) -> Any:
        if self.ws.mode == "gunicorn":
            raise StopIteration()
        return super().__call__(environ, start_response)


def ask_agent(endpoint: str, keys: curve.Client, kind: bytes, body: dict[str, Any],
              wait_for: bytes, timeout: float = AGENT_ANSWER_S) -> None:
    """One request to an agent's run socket, until it says `wait_for` (alive frames
    extend nothing: a start that prepares a release keeps saying alive). RuntimeError with
    the agent's reason, AgentSilent when it does not answer."""
    sock = _dealer(zmq.Context.instance(), endpoint, keys)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.send_multipart([kind, json.dumps(body).encode()])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sock.poll(200):
                continue
            got, data = sock.recv_multipart()
            if got == wait_for:
                return
            if got == b"error":
                raise RuntimeError(data.decode("utf-8", "replace"))
        raise AgentSilent(f"the host agent at {endpoint} did not answer in {timeout:.0f} s")
    finally:
        sock.close()


def relay(ws: Server, endpoint: str, keys: curve.Client, request_body: dict[str, Any],
          lost: Callable[[str], None]) -> None:
    """Carry one attached run between the CLI's WebSocket and the agent, until the command
    exits, the agent refuses or is lost (`lost(message)` then records it), or the CLI is
    gone (its command then gets SIGHUP, as when an ssh session drops)."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    agent = _dealer(ctx, endpoint, keys)
    agent.setsockopt(zmq.LINGER, 1000)  # a last HUP still goes out as we leave
    inbox = f"inproc://relay-{uuid.uuid4().hex}"
    from_cli = ctx.socket(zmq.PAIR)
    from_cli.bind(inbox)
    reader = threading.Thread(target=_read_cli, args=(ws, ctx, inbox), daemon=True)
    reader.start()
    poller = zmq.Poller()
    poller.register(agent, zmq.POLLIN)
    poller.register(from_cli, zmq.POLLIN)
    try:
        agent.send_multipart([b"run", json.dumps(request_body).encode()])
        heard_agent = heard_cli = time.monotonic()
        while True:
            ready = dict(poller.poll(int(KEEPALIVE_S * 1000)))
            now = time.monotonic()
            if from_cli in ready:
                kind, data = from_cli.recv_multipart()
                if kind == b"closed":
                    agent.send_multipart([b"signal", b"HUP"])
                    return
                heard_cli = now
                agent.send_multipart([kind, data])  # alive only when the CLI said so
            if agent in ready:
                heard_agent = now
                kind, data = agent.recv_multipart()
                if kind == b"out":
                    ws.send(data)
                elif kind == b"alive":
                    ws.send('{"type": "alive"}')
                elif kind == b"exit":
                    ws.send(json.dumps({"type": "exit", "code": int(data)}))
                    return
                elif kind == b"error":
                    ws.send(json.dumps({"type": "error",
                                        "message": data.decode("utf-8", "replace")}))
                    return
            if now - heard_agent > SILENCE_S:
                message = (f"lost the host agent: not a word for {SILENCE_S:.0f} s; the "
                           f"command may still be running there")
                lost(message)
                ws.send(json.dumps({"type": "error", "message": message}))
                return
            if now - heard_cli > SILENCE_S + 5:
                return  # the agent has hung the command up by now: nobody is listening
    except ConnectionClosed:
        agent.send_multipart([b"signal", b"HUP"])
    finally:
        agent.close()
        from_cli.close()
        with contextlib.suppress(Exception):  # already closed by the peer
            ws.close()
        reader.join(2)


def _read_cli(ws: Server, ctx: zmq.Context, inbox: str) -> None:
    """The CLI's messages, as agent frames, to the relay loop (a ZeroMQ socket belongs
    to one thread, hence the pair)."""
    out = ctx.socket(zmq.PAIR)
    out.connect(inbox)
    try:
        while True:
            try:
                msg = ws.receive()
            except ConnectionClosed:
                break
            if msg is None:
                break
            frame = _frame(msg)
            if frame is not None:
                out.send_multipart(frame, zmq.NOBLOCK)
        out.send_multipart([b"closed", b""], zmq.NOBLOCK)
    except zmq.ZMQError:  # the relay has ended and closed its side
        pass
    finally:
        out.close(linger=0)


def _frame(msg: str | bytes) -> list[bytes] | None:
    """A CLI message as a frame for the agent; None for anything not understood."""
    if isinstance(msg, bytes):
        return [b"in", msg]
    try:
        m = json.loads(msg)
        kind = m["type"]
        if kind == "alive":
            return [b"alive", b""]
        if kind == "eof":
            return [b"eof", b""]
        if kind == "resize":
            return [b"resize", json.dumps([int(m["rows"]), int(m["cols"])]).encode()]
        if kind == "signal" and m["name"] in ("INT", "KILL"):
            return [b"signal", m["name"].encode()]
    except (ValueError, KeyError, TypeError):
        pass
    return None
