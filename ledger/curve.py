"""CURVE on the relays' PUB and the log collector: only known keys may subscribe or ship.

A wake-up says nothing secret ("the ledger moved to P"), but an open PUB lets anyone map
the platform's activity and hold sockets open on the relays. With CURVE, each relay has a
server keypair; every subscriber has a client keypair, and the relay's ZAP handler admits
only the control plane's key (projectors, placer, API... beside the ledger) and the keys
that hosts registered through the API (HostRegistered.public_key, appended by the API
for the agent token of that host). A process with no registered key gets no wake-up; it
can still poll the API, as every host does on its timer anyway.

The log collector (agents/logs.py) serves CURVE the same way, with a keypair of its own
(`collector.curve`) and the same admission: agents ship with the keypair they registered,
so a line reaches an app's log only from the agent that runs it (or a balancer of the
control plane), never from an app or anyone else on the network.

Keys are z85 text, one keypair per file (public, then secret; 0600). The composition root
of a process says which client keypair its subscribers use (`use`); a relay started with
`--curve` serves with its own (`serve`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import zmq
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("tally.curve")


@dataclass(frozen=True)
class Keypair:
    public: bytes
    secret: bytes


@dataclass(frozen=True)
class Client:
    """What a subscriber needs: the relays' public key and its own keypair."""

    server_public: bytes
    own: Keypair


def load_or_create(path: Path) -> Keypair:
    """The keypair kept in `path` (made, 0600, on first use)."""
    if path.exists():
        public_z85, secret_z85 = path.read_text().split()[:2]
        return Keypair(public_z85.encode(), secret_z85.encode())
    public, secret = zmq.curve_keypair()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    part.touch(mode=0o600)
    part.write_text(f"{public.decode()}\n{secret.decode()}\n")
    try:
        os.link(part, path)  # never over another process's key made meanwhile
    except FileExistsError:
        return load_or_create(path)
    finally:
        part.unlink()
    return Keypair(public, secret)


def from_seed(seed: bytes) -> Keypair:
    """The keypair whose secret is these 32 bytes: every process that knows the seed has
    the same one, with no file to share (the API's processes: their run channel's)."""
    from zmq.utils import z85

    secret = z85.encode(seed[:32])
    return Keypair(zmq.curve_public(secret), secret)


_default: Client | None = None


def use(client: Client | None) -> None:
    """The client keypair this process's subscribers use unless told otherwise."""
    global _default
    _default = client


def default() -> Client | None:
    return _default


def as_client(socket: zmq.Socket, client: Client) -> None:
    """Make a socket a CURVE client of the relays (before it connects)."""
    socket.curve_serverkey = client.server_public
    socket.curve_publickey = client.own.public
    socket.curve_secretkey = client.own.secret


class Allowed:
    """ZAP credentials provider: the fixed keys, plus the public keys hosts registered.
    Registered keys are read from the ledger when an unknown key knocks (at most every
    `refresh_s`), so a host that just registered is admitted on its next try."""

    def __init__(self, fixed: set[bytes], dsn: str | None, refresh_s: float = 1.0) -> None:
        self.fixed, self.dsn, self.refresh_s = set(fixed), dsn, refresh_s
        self.hosts: dict[str, bytes] = {}
        self._position = 0
        self._refreshed = -refresh_s
        self._ledger: Any = None
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.fixed:
            return True
        with self._lock:
            if key not in self.hosts.values() and (time.monotonic() - self._refreshed
                                                   >= self.refresh_s):
                self._refresh()
            allowed = key in self.hosts.values()
        if not allowed:
            log.warning("refused a subscriber with an unregistered key %s", key[:8].decode())
        return allowed

    def registered(self) -> dict[str, bytes]:
        """Host -> public key, a copy taken under the lock (another thread, the ZAP
        handler's, adds to it as hosts register)."""
        with self._lock:
            return dict(self.hosts)

    def _refresh(self) -> None:
        from ledger.errors import LedgerError
        from ledger.store import Ledger

        self._refreshed = time.monotonic()
        if self.dsn is None:
            return
        try:
            if self._ledger is None:
                self._ledger = Ledger(self.dsn, retry_deadline=1.0, notify=False,
                                      application_name="tally-relay-zap")
            while batch := self._ledger.read_all(self._position, limit=5000,
                                                 categories=["host"],
                                                 types=["HostRegistered"]):
                for e in batch:
                    self.hosts[e.data["host_id"]] = e.data.get("public_key", "").encode()
                self._position = batch[-1].position or self._position
        except LedgerError as exc:
            log.warning("cannot read the registered host keys: %s", exc)


class Admits(Protocol):
    """A ZAP credentials provider: whether a client's public key (z85) may connect."""

    def callback(self, domain: str, key: bytes) -> bool: ...


def serve(socket: zmq.Socket, own: Keypair, allowed: Admits,
          context: zmq.Context) -> ThreadAuthenticator:
    """Make a socket a CURVE server admitting what `allowed` says (before it binds); the
    authenticator runs until stopped."""
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=allowed)
    socket.curve_server = True
    socket.curve_publickey = own.public
    socket.curve_secretkey = own.secret
    return auth
