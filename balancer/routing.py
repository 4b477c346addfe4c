"""The routing table and the choice of a backend, sans-IO: from a Host header and the
routes, what to do with a request (forward to this backend, hold it, or answer a page).

Hostnames are exact (`www.example.com`) or wildcards (`*.example.com`, matching any name
ending in `.example.com`, at any depth); an exact name wins over a wildcard and a longer
wildcard over a shorter one. Backends are `address:port`. A backend's state (connections in
use, passive health) lives in one `Backend` per address and survives route reloads, so a
reload neither forgets a failing backend nor miscounts connections of requests in flight.

Passive health: a backend that refused or reset `max_fails` times in a row is left out for
`cooldown` seconds (doubling while it keeps failing, at most 8 times); a success forgets its
failures. The agents' own health checks decide which backends the routes list at all.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import final

ROUND_ROBIN, LEAST_CONNECTIONS = "round-robin", "least-connections"
POLICIES = (ROUND_ROBIN, LEAST_CONNECTIONS)


@dataclass(frozen=True)
class Route:
    hostname: str
    app: str
    backends: tuple[str, ...] = ()
    maintenance: bool = False
    https_only: bool = False
    """Plain HTTP requests are redirected (308) to https."""
    hsts: str = ""
    """The Strict-Transport-Security value sent over https (none when empty)."""
    tls: tuple[str, str, str] | None = None
    """The certificate served for this hostname by SNI: (id, PEM chain, sealed key)."""
    challenges: tuple[tuple[str, str], ...] = ()
    """ACME HTTP-01 challenges of an order under way: (token, key authorization)."""
    slug: tuple[int, str] | None = None
    """(release, digest) of the slug whose static files are served for this hostname."""


class Backend:
    """One backend address and what we observed of it."""

    __slots__ = ("address", "host", "port", "active", "failures", "down_until")

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"backend {address!r} is not address:port")
        self.address = address
        self.host = host.strip("[]")
        self.port = int(port)
        self.active = 0
        self.failures = 0
        self.down_until = 0.0

    def __repr__(self) -> str:
        return f"Backend({self.address!r}, active={self.active}, failures={self.failures})"


@dataclass(frozen=True)
class Settings:
    policy: str = ROUND_ROBIN
    max_fails: int = 1
    """Consecutive failures (refused, reset) that take a backend out."""
    cooldown: float = 2.0
    """Seconds a failing backend stays out (doubling while it keeps failing)."""


@final
@dataclass(frozen=True)
class Forward:
    route: Route
    backend: Backend


@final
@dataclass(frozen=True)
class Hold:
    """No healthy backend now: wait for one (routes update, a backend's cooldown ends)."""

    route: Route


@final
@dataclass(frozen=True)
class Answer:
    status: int
    text: str


@final
@dataclass(frozen=True)
class Challenge:
    """An ACME HTTP-01 challenge we answer ourselves (before maintenance or a redirect: the
    CA asks over plain HTTP, whatever the app's state)."""

    route: Route
    key_authorization: str


@final
@dataclass(frozen=True)
class Redirect:
    """To the same URL over https."""

    route: Route


Decision = Forward | Hold | Answer | Redirect | Challenge
"""What to do with a request. Each kind is final, so a shell that tests `type(d) is K` (the
fast test on its hot path) is checked as if it used isinstance."""
CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"


class Router:
    """The routes in force and every backend's state."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        if self.settings.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}")
        self.version = -1
        self._exact: dict[str, tuple[Route, tuple[Backend, ...]]] = {}
        self._wild: dict[str, tuple[Route, tuple[Backend, ...]]] = {}
        self._backends: dict[str, Backend] = {}
        self._turn = itertools.count()

    def update(self, routes: Iterable[Route], version: int) -> None:
        """Put `routes` in force. Requests already forwarded keep their Backend object;
        a backend that is still listed keeps its state."""
        old = self._backends
        backends: dict[str, Backend] = {}
        exact: dict[str, tuple[Route, tuple[Backend, ...]]] = {}
        wild: dict[str, tuple[Route, tuple[Backend, ...]]] = {}
        for route in routes:
            chosen = []
            for address in route.backends:
                b = backends.get(address) or old.get(address) or Backend(address)
                backends[address] = b
                chosen.append(b)
            name = route.hostname.lower().rstrip(".")
            if name.startswith("*."):
                wild[name[1:]] = (route, tuple(chosen))
            else:
                exact[name] = (route, tuple(chosen))
        self._exact, self._wild, self._backends = exact, wild, backends
        self.version = version

    def lookup(self, host: str) -> tuple[Route, tuple[Backend, ...]] | None:
        """The route for a (normalised) hostname: exact, else the longest wildcard."""
        hit = self._exact.get(host)
        if hit is not None or not self._wild:
            return hit
        dot = host.find(".")
        while dot >= 0:
            hit = self._wild.get(host[dot:])
            if hit is not None:
                return hit
            dot = host.find(".", dot + 1)
        return None

    def decide(self, host: str, now: float, exclude: tuple[Backend, ...] = (),
               secure: bool = False, target: bytes = b"") -> Decision:
        hit = self.lookup(host)
        if hit is None:
            return Answer(404, "unknown host")
        route, backends = hit
        if route.challenges and target.startswith(CHALLENGE_PREFIX):
            token = target[len(CHALLENGE_PREFIX):].decode("ascii", "replace")
            answer = next((k for t, k in route.challenges if t == token), None)
            if answer is not None:
                return Challenge(route, answer)
        if route.maintenance:
            return Answer(503, "maintenance")
        if route.https_only and not secure:
            return Redirect(route)
        backend = self.choose(backends, now, exclude)
        if backend is None:
            return Hold(route)
        return Forward(route, backend)

    def choose(self, backends: tuple[Backend, ...], now: float,
               exclude: tuple[Backend, ...] = ()) -> Backend | None:
        if len(backends) == 1:  # the usual app, without a comprehension's call
            only = backends[0]
            return only if only.down_until <= now and only not in exclude else None
        usable = [b for b in backends if b.down_until <= now and b not in exclude]
        if not usable:
            return None
        if self.settings.policy == LEAST_CONNECTIONS:
            least = min(b.active for b in usable)
            usable = [b for b in usable if b.active == least]
        return usable[next(self._turn) % len(usable)]

    def failed(self, backend: Backend, now: float) -> None:
        """The backend refused or reset: count it, and take it out after max_fails."""
        backend.failures += 1
        if backend.failures >= self.settings.max_fails:
            doublings = min(backend.failures - self.settings.max_fails, 3)
            backend.down_until = now + self.settings.cooldown * (2 ** doublings)

    def succeeded(self, backend: Backend) -> None:
        if backend.failures:
            backend.failures = 0
            backend.down_until = 0.0

    def next_wake(self, backends: tuple[Backend, ...], now: float) -> float | None:
        """When a held request's backends next come out of cooldown, if any will."""
        times = [b.down_until for b in backends if b.down_until > now]
        return min(times) if times else None
