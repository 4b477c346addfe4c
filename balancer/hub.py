"""An eventlet hub whose epoll registrations are one-shot (EPOLLONESHOT).

eventlet's epoll hub adds a descriptor to the epoll set when a green thread starts waiting
on it and removes it when the wait ends: two epoll_ctl calls per wait, four per proxied
request, as many as all its reads and writes. Here a descriptor stays in the set; each wait
re-arms it with one epoll_ctl (none when it is still armed from a wait that ended
otherwise, say by a timeout), and the kernel disarms it when it fires. A descriptor closed
by us leaves the set by itself (the kernel drops it with its last reference); its number,
when reused, is registered again.

Listeners that stay registered across events (eventlet.green.zmq's) are re-armed after each
dispatch.
"""

from __future__ import annotations

import errno
import select
import sys
import time
from typing import Any

from eventlet.hubs import epolls
from eventlet.hubs import hub as basehub

READ, WRITE = basehub.READ, basehub.WRITE
ONESHOT = select.EPOLLONESHOT
READ_MASK = select.EPOLLIN | select.EPOLLPRI
WRITE_MASK = select.EPOLLOUT
EXC_MASK = select.EPOLLERR | select.EPOLLHUP


class Hub(epolls.Hub):
    def __init__(self, clock: Any = None) -> None:
        super().__init__(clock)
        self._known: set[int] = set()
        self._armed: dict[int, int] = {}

    def _mask(self, fileno: int) -> int:
        mask = 0
        if fileno in self.listeners[READ]:
            mask |= READ_MASK | EXC_MASK
        if fileno in self.listeners[WRITE]:
            mask |= WRITE_MASK | EXC_MASK
        return mask

    def _arm(self, fileno: int) -> None:
        mask = self._mask(fileno)
        if not mask or self._armed.get(fileno) == mask:
            return
        poll = self.poll
        try:
            if fileno in self._known:
                poll.modify(fileno, mask | ONESHOT)
            else:
                poll.register(fileno, mask | ONESHOT)
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # closed since, and its number reused
                poll.register(fileno, mask | ONESHOT)
            elif exc.errno == errno.EEXIST:
                poll.modify(fileno, mask | ONESHOT)
            else:
                raise
        self._known.add(fileno)
        self._armed[fileno] = mask

    def add(self, evtype: str, fileno: int, cb: Any, tb: Any, mac: Any) -> Any:
        listener = basehub.BaseHub.add(self, evtype, fileno, cb, tb, mac)
        self._arm(fileno)
        return listener

    def remove(self, listener: Any) -> None:
        # Left armed: if it fires with nobody waiting, the callback is a no-op and the
        # kernel disarms it; the next wait on it re-arms it.
        basehub.BaseHub.remove(self, listener)

    def remove_descriptor(self, fileno: int) -> None:
        self._known.discard(fileno)
        self._armed.pop(fileno, None)
        super().remove_descriptor(fileno)

    def wait(self, seconds: float | None = None) -> None:
        readers = self.listeners[READ]
        writers = self.listeners[WRITE]
        if not readers and not writers:
            if seconds:
                time.sleep(seconds)
            return
        try:
            presult = self.poll.poll(seconds)
        except InterruptedError:
            return
        noop = basehub.noop
        armed = self._armed
        callbacks = set()
        for fileno, event in presult:
            armed.pop(fileno, None)  # one-shot: disarmed by the kernel now
            if event & (READ_MASK | EXC_MASK):
                callbacks.add((readers.get(fileno, noop), fileno))
            if event & (WRITE_MASK | EXC_MASK):
                callbacks.add((writers.get(fileno, noop), fileno))
        for listener, fileno in callbacks:
            try:
                listener.cb(fileno)
            except self.SYSTEM_EXCEPTIONS:
                raise
            except BaseException:
                self.squelch_exception(fileno, sys.exc_info())
        for fileno, _ in presult:  # listeners that outlive an event (green zmq's)
            if fileno not in armed and (fileno in readers or fileno in writers):
                self._arm(fileno)
