"""An eventlet hub with two kinds of epoll registration, both cheaper than eventlet's.

eventlet's epoll hub adds a descriptor to the epoll set when a green thread starts waiting
on it and removes it when the wait ends: two epoll_ctl calls per wait, four per proxied
request, as many as all its reads and writes.

- The proxy's own sockets (`io_wait`) are registered once, edge-triggered (EPOLLET), for
  reading and writing: no epoll_ctl per wait at all. An edge that comes while nobody waits
  is kept as a pending bit, and the next wait for it returns at once; so a wait is right
  whenever the caller last saw EAGAIN or a short read (shell.py keeps to that: after a read
  that filled its buffer it marks the socket ready with `readable`). A stale bit costs one
  failed call, never a lost wake-up.
- Everything else (the listeners, eventlet.green.zmq, the thread pool's pipe) waits through
  eventlet's `trampoline` with a one-shot registration (EPOLLONESHOT): the descriptor stays
  in the set and each wait re-arms it with one epoll_ctl (none when still armed from a wait
  that ended otherwise, say by a timeout); the kernel disarms it when it fires. Listeners
  that stay registered across events (green zmq's) are re-armed after each dispatch.

A descriptor closed by us leaves the set by itself (the kernel drops it with its last
reference); its number, when reused by another socket, is registered again (edge-triggered
registrations remember their socket object, so a new one under an old number is noticed).
"""

from __future__ import annotations

import errno
import select
import sys
import time
from typing import Any

import greenlet
from eventlet.hubs import epolls
from eventlet.hubs import hub as basehub

READ, WRITE = basehub.READ, basehub.WRITE
ONESHOT = select.EPOLLONESHOT
READ_MASK = select.EPOLLIN | select.EPOLLPRI
WRITE_MASK = select.EPOLLOUT
EXC_MASK = select.EPOLLERR | select.EPOLLHUP
EDGE_MASK = (select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET)
EDGE_READ = READ_MASK | EXC_MASK | select.EPOLLRDHUP
EDGE_WRITE = WRITE_MASK | EXC_MASK
PENDING_READ, PENDING_WRITE = 1, 2
getcurrent = greenlet.getcurrent


class Hub(epolls.Hub):
    def __init__(self, clock: Any = None) -> None:
        super().__init__(clock)
        self._known: set[int] = set()
        self._armed: dict[int, int] = {}
        self._edge: dict[int, object] = {}
        """Edge-triggered descriptors -> the socket object registered under that number."""
        self._pending: dict[int, int] = {}
        """Edges that came while nobody waited (PENDING_READ | PENDING_WRITE)."""
        self._edge_waiters: tuple[dict[int, Any], dict[int, Any]] = ({}, {})
        """Green threads waiting on an edge-triggered descriptor, to read and to write."""

    def io_wait(self, sock: object, fileno: int, write: bool = False) -> None:
        """Until `sock` (whose descriptor is `fileno`) may be read (or written): returns at
        once if an edge came since the last wait. Only the proxy's sockets use this."""
        if self._edge.get(fileno) is not sock:
            self._register_edge(sock, fileno)
        bit = PENDING_WRITE if write else PENDING_READ
        pending = self._pending.get(fileno, 0)
        if pending & bit:
            self._pending[fileno] = pending & ~bit
            return
        waiters = self._edge_waiters[write]
        waiters[fileno] = current = getcurrent()
        # BaseHub.switch without what a proxy's green thread never needs (a `switch_out`
        # hook, a dead hub to replace: the hub runs it): twice per proxied request.
        hub = self.greenlet
        if hub.parent is not current:
            try:  # noqa: SIM105 (cheaper than contextlib.suppress, on the hot path)
                current.parent = hub
            except ValueError:
                pass  # a parent cycle: as BaseHub.switch
        try:
            hub.switch()
        finally:
            waiters.pop(fileno, None)

    def readable(self, fileno: int) -> None:
        """The caller left data unread on an edge-triggered descriptor: its next wait for
        reading returns at once."""
        self._pending[fileno] = self._pending.get(fileno, 0) | PENDING_READ

    def _register_edge(self, sock: object, fileno: int) -> None:
        poll = self.poll
        try:
            poll.register(fileno, EDGE_MASK)
        except OSError as exc:
            if exc.errno != errno.EEXIST:  # our one-shot registration, or an old socket's
                raise
            poll.modify(fileno, EDGE_MASK)  # (a new registration reports what is ready)
        self._known.add(fileno)
        self._armed.pop(fileno, None)
        self._edge[fileno] = sock
        self._pending[fileno] = 0

    def _mask(self, fileno: int) -> int:
        mask = 0
        if fileno in self.listeners[READ]:
            mask |= READ_MASK | EXC_MASK
        if fileno in self.listeners[WRITE]:
            mask |= WRITE_MASK | EXC_MASK
        return mask

    def _arm(self, fileno: int) -> None:
        if self._edge.pop(fileno, None) is not None:  # its number, now a one-shot's
            self._pending.pop(fileno, None)
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
        self._edge.pop(fileno, None)
        self._pending.pop(fileno, None)
        super().remove_descriptor(fileno)

    def wait(self, seconds: float | None = None) -> None:
        readers = self.listeners[READ]
        writers = self.listeners[WRITE]
        edge_readers, edge_writers = self._edge_waiters
        if not readers and not writers and not edge_readers and not edge_writers:
            if seconds:
                time.sleep(seconds)
            return
        try:
            presult = self.poll.poll(seconds)
        except InterruptedError:
            return
        noop = basehub.noop
        armed = self._armed
        edge, pending = self._edge, self._pending
        callbacks = set()
        woken = []
        kinds = ((EDGE_READ, edge_readers, PENDING_READ),
                 (EDGE_WRITE, edge_writers, PENDING_WRITE))
        for fileno, event in presult:
            if fileno in edge:
                for mask, waiters, bit in kinds:
                    if event & mask:
                        waiter = waiters.pop(fileno, None)
                        if waiter is None:  # nobody waits: kept for the next wait
                            pending[fileno] = pending.get(fileno, 0) | bit
                        else:
                            woken.append(waiter)
                continue
            armed.pop(fileno, None)  # one-shot: disarmed by the kernel now
            if event & (READ_MASK | EXC_MASK):
                callbacks.add((readers.get(fileno, noop), fileno))
            if event & (WRITE_MASK | EXC_MASK):
                callbacks.add((writers.get(fileno, noop), fileno))
        for waiter in woken:
            if not waiter.dead:
                waiter.switch()
        for listener, fileno in callbacks:
            try:
                listener.cb(fileno)
            except self.SYSTEM_EXCEPTIONS:
                raise
            except BaseException:
                self.squelch_exception(fileno, sys.exc_info())
        for fileno, _ in presult:  # listeners that outlive an event (green zmq's)
            if fileno not in armed and fileno not in edge and (
                    fileno in readers or fileno in writers):
                self._arm(fileno)
