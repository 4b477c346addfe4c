"""Waiting for a condition with a deadline: the only synchronisation tests may use."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, message: str,
               interval: float = 0.02) -> T:
    """Call `condition` until it returns something truthy; fail with `message` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        time.sleep(interval)


class Lines:
    """The lines a child process writes to a pipe, read by a thread, so a test waits for
    one with a deadline that fires (a bare `readline()` blocks until the pipe says
    something, however long that takes)."""

    def __init__(self, stream: IO[Any]) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[Any]) -> None:
        try:
            for line in iter(stream.readline, stream.read(0)):
                self._queue.put(line)
        except (OSError, ValueError):  # closed under us: the test is over
            pass
        self._queue.put(None)

    def next(self, timeout: float, message: str) -> Any:
        """The next line; AssertionError with `message` after `timeout` seconds, or when
        the pipe closed first."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"timed out after {timeout}s: {message}") from None
        if line is None:
            raise AssertionError(f"the pipe closed: {message}")
        return line

    def until(self, match: Callable[[Any], T], timeout: float, message: str) -> T:
        """The first truthy match(line), within `timeout` seconds in all."""
        deadline = time.monotonic() + timeout
        while True:
            found = match(self.next(max(0.0, deadline - time.monotonic()), message))
            if found:
                return found
