"""The balancer's edge-triggered hub (balancer/hub.py) loses no wake-up.

Edge-triggered epoll reports a socket once per arrival, so a wait must not sleep on data
that is already there. Run in a child process: the hub is eventlet's, installed process-wide,
and eventlet stays out of the test runner (it is the balancer's entry point's alone)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import socket, warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import eventlet, eventlet.hubs
from balancer.hub import Hub
eventlet.hubs.use_hub(Hub)
from balancer import shell

def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b

def within(seconds, fn, *args):
    with eventlet.Timeout(seconds, False):
        return fn(*args)
    return "timed out"

# Something else waits all along, so the hub polls (and sees edges) while nobody waits on
# the sockets under test.
idle_a, idle_b = pair()
eventlet.spawn(shell.recv, idle_a)

# 1. more than one read's worth arrives at once, after a wait consumed its edge: the next
#    "nothing can be there yet" read must not wait for an edge that will never come.
a, b = pair()
b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
def blast():
    b.setblocking(True)
    b.sendall(b"x" * (shell.RECV + 10))
    b.setblocking(False)
eventlet.spawn_after(0.05, blast)
print("full", len(within(2, shell.recv_later, a)))
print("rest", len(within(2, shell.recv_later, a)))

# 2. data that arrives while nobody waits is not lost: the edge is kept for the next wait.
shell.sendall(b, b"ping")
eventlet.sleep(0.05)  # the hub polls and sees the edge with no waiter
print("kept", within(2, shell.recv_later, a))

# 3. a reader blocked first is woken by what arrives later.
eventlet.spawn_after(0.05, b.sendall, b"later")
print("woken", within(2, shell.recv_later, a))

# 4. a descriptor number reused by a new socket after a close is registered again.
number = a.fileno()
a.close(); b.close()
c, d = pair()
e, f = (c, d) if c.fileno() == number else (d, c)
print("reused", e.fileno() == number)
eventlet.spawn_after(0.05, f.sendall, b"again")
print("new", within(2, shell.recv_later, e))

# 5. a send that fills the buffer waits for room, and resumes when the peer reads.
big = b"y" * (8 << 20)
got = []
def drain():
    while sum(got) < len(big):
        got.append(len(shell.recv(f)))
reader = eventlet.spawn(drain)
print("sent", within(5, shell.sendall, e, big))
print("received", within(5, lambda: reader.wait() or sum(got)))
'''


def test_edge_triggered_waits_lose_no_wake_up() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["full"] == "262144"
    assert lines["rest"] == "10"
    assert lines["kept"] == "b'ping'"
    assert lines["woken"] == "b'later'"
    assert lines["reused"] == "True"
    assert lines["new"] == "b'again'"
    assert lines["sent"] == "None"
    assert lines["received"] == str(8 << 20)
