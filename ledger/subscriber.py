"""Wake-ups from the relays, for anything that follows the ledger.

A subscriber connects one SUB socket to every relay (we run two), keeps the highest head
it has heard, and wakes its caller when that head moves. It is only a hint: callers read
from their own checkpoint, and call `wait` with a timeout so they poll anyway.

    sub = Subscriber(["tcp://127.0.0.1:5551", "tcp://127.0.0.1:5552"])
    while running:
        checkpoint = catch_up(checkpoint)     # read position > checkpoint
        sub.wait(timeout=1.0)                 # a wake-up, or the poll timer

With `topics`, it wakes only for those (a host agent: its own host's and its apps', as
ledger/relay.py publishes them), and `follow` changes them as what it runs changes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import zmq

from ledger import curve as curve_keys
from ledger.relay import TICK, TOPIC


class Subscriber:
    """Listens to several relays at once and de-duplicates what they say."""

    def __init__(self, endpoints: Sequence[str], context: zmq.Context | None = None,
                 curve: curve_keys.Client | None = None, resubscribe_s: float = 10.0,
                 topics: Iterable[bytes] | None = None) -> None:
        self.context = context or zmq.Context.instance()
        self.endpoints, self.resubscribe_s = list(endpoints), resubscribe_s
        self.curve = curve or curve_keys.default()
        self.topics = None if topics is None else set(topics)
        """What wakes it (None: every move of the ledger)."""
        self.head = 0
        self._open()

    def _open(self) -> None:
        """A SUB socket connected to every relay. Relays republish their head every poll
        tick, so silence for resubscribe_s means no relay admitted us (CURVE refuses a key
        not registered yet, and libzmq does not retry a refused handshake) or none is up:
        then the socket is made again."""
        self.heard = time.monotonic()
        self.socket = self.context.socket(zmq.SUB)
        if self.curve is not None:  # relays served with CURVE admit only known keys
            curve_keys.as_client(self.socket, self.curve)
        self.socket.setsockopt(zmq.LINGER, 0)
        for topic in [TOPIC] if self.topics is None else [TICK, *self.topics]:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 100)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        for endpoint in self.endpoints:
            self.socket.connect(endpoint)

    def wait(self, timeout: float) -> int | None:
        """Block up to `timeout` seconds for a head beyond the last one seen.

        Returns the new head, or None on timeout (the caller polls anyway)."""
        before = self.head
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.socket.poll(max(1, int(remaining * 1000))):
                if time.monotonic() - self.heard > self.resubscribe_s:
                    self.socket.close()
                    self._open()
                return None
            self.heard = time.monotonic()
            self._drain()
            if self.head > before:
                return self.head

    def follow(self, topics: Iterable[bytes]) -> None:
        """Wake for these topics from now on (a subscriber made with topics)."""
        new = set(topics)
        assert self.topics is not None, "a subscriber to every move follows no topics"
        for topic in new - self.topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        for topic in self.topics - new:
            self.socket.setsockopt(zmq.UNSUBSCRIBE, topic)
        self.topics = new

    def _drain(self) -> None:
        while True:
            try:
                topic, position = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue  # not ours: ignore rather than die
            if topic == TICK and self.topics is not None:
                continue  # a relay is there: heard, not woken
            try:
                self.head = max(self.head, int(position))
            except ValueError:
                continue

    def close(self) -> None:
        self.socket.close()
