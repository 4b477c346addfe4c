"""The agent's health probe against real sockets: each verdict in words, and an app that
answers slowly on purpose cannot hold the probe past its timeout."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from agents.health import MAX_TIMEOUT, Check, probe


@contextmanager
def server(answer: Callable[[socket.socket], None]) -> Iterator[int]:
    """A listener on a free port whose each connection is given to `answer`."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)  # closing a listener does not wake a blocked accept()
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            with conn:
                conn.recv(4096)
                with suppress(OSError):
                    answer(conn)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        listener.close()
        thread.join(5)


def test_an_app_dripping_its_answer_is_cut_off_at_the_timeout() -> None:
    """The review's case: a status line and then one byte every 0.2 s kept a per-read
    timeout waiting forever, freezing the agent's loop and its heartbeats."""
    def drip(conn: socket.socket) -> None:
        conn.sendall(b"H")
        for _ in range(15):
            time.sleep(0.2)  # the attacker's pace, not synchronisation
            conn.sendall(b"T")
    with server(drip) as port:
        verdict = probe("127.0.0.1", port, Check(0.5, "/healthz"))
    # Without the deadline the probe reads the whole 3 s drip and ends on the closed
    # connection ("no HTTP answer"), never on the timeout.
    assert not verdict.ok and verdict.message == "no answer within 0.5 s on /healthz"


def test_verdicts_say_what_happened() -> None:
    with server(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")) as port:
        assert probe("127.0.0.1", port, Check(1.0, "/")).ok
    with server(lambda c: c.sendall(b"HTTP/1.0 500 Oops\r\n\r\n")) as port:
        verdict = probe("127.0.0.1", port, Check(1.0, "/"))
        assert (verdict.ok, verdict.message, verdict.answered) == (
            False, "answered 500 on /", True)
    with server(lambda c: c.sendall(b"SSH-2.0-nope\r\n")) as port:
        assert "no HTTP answer on /" in probe("127.0.0.1", port, Check(1.0, "/")).message
    with server(lambda c: c.sendall(b"x" * 20000)) as port:
        assert "no HTTP answer on /" in probe("127.0.0.1", port, Check(1.0, "/")).message
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    assert probe("127.0.0.1", port, Check(1.0, "/")).message == f"port {port} not bound"


def test_an_apps_own_timeout_is_capped() -> None:
    assert Check.from_config({"TALLY_HEALTHCHECK_TIMEOUT": "3600"}, 1.0).timeout == MAX_TIMEOUT
