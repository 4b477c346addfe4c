"""Where routes come from: the routes view through the API, or a JSON file (standalone mode).

Plain blocking code with no eventlet in it: the shell calls the API reader in a thread
pool (eventlet.tpool), so a slow API never stalls requests.

The file holds `{"routes": [{"hostname": "blog.example.com", "app": "blog",
"backends": ["127.0.0.1:8001"], "maintenance": false}, ...]}` (or just the list); it is
read again whenever its modification time, size or inode change. A file that does not parse
keeps the routes in force (and says why on stderr): a typo must not take every app down.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from balancer.routing import Backend, Route


class RoutesError(ValueError):
    """A routes file we cannot use."""


def routes_from_json(doc: Any) -> list[Route]:
    items = doc.get("routes") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise RoutesError('expected {"routes": [...]} or a list of routes')
    routes = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("hostname"), str):
            raise RoutesError(f"route {i}: needs a hostname")
        backends = item.get("backends", [])
        if not isinstance(backends, list) or not all(isinstance(b, str) for b in backends):
            raise RoutesError(f"route {i}: backends must be a list of 'address:port'")
        for b in backends:
            try:
                Backend(b)
            except ValueError as exc:
                raise RoutesError(f"route {i}: {exc}") from None
        hsts = item.get("hsts", "")
        if not isinstance(hsts, str) or not hsts.isprintable():
            raise RoutesError(f"route {i}: hsts must be a header value, e.g. max-age=31536000")
        routes.append(Route(item["hostname"].lower(), str(item.get("app", item["hostname"])),
                            tuple(backends), bool(item.get("maintenance", False)),
                            bool(item.get("https_only", False)), hsts,
                            _tls(item.get("tls"), i), _challenges(item.get("challenges"), i),
                            _slug(item.get("slug"), i)))
    return routes


def _slug(slug: Any, i: int) -> tuple[int, str] | None:
    """A route's slug: {"release": N, "digest": sha256} or null."""
    if slug is None:
        return None
    if not (isinstance(slug, dict) and isinstance(slug.get("release"), int)
            and isinstance(slug.get("digest"), str) and len(slug["digest"]) == 64
            and all(c in "0123456789abcdef" for c in slug["digest"])):
        raise RoutesError(f"route {i}: slug must be null or {{release, digest}}")
    return slug["release"], slug["digest"]


def _challenges(challenges: Any, i: int) -> tuple[tuple[str, str], ...]:
    """A route's ACME challenges: {token: key authorization} (printable ASCII both)."""
    if not challenges:
        return ()
    if not isinstance(challenges, dict) or not all(
            isinstance(v, str) and t.isascii() and t.isprintable() and v.isascii()
            and v.isprintable() for t, v in challenges.items()):
        raise RoutesError(f"route {i}: challenges must map tokens to key authorizations")
    return tuple(sorted(challenges.items()))


def _tls(tls: Any, i: int) -> tuple[str, str, str] | None:
    """A route's certificate: {"cert_id", "cert" (PEM chain), "key" (sealed)} or null."""
    if tls is None:
        return None
    if not isinstance(tls, dict) or not all(
            isinstance(tls.get(k), str) and tls.get(k) for k in ("cert_id", "cert", "key")):
        raise RoutesError(f"route {i}: tls must be null or have cert_id, cert and key")
    return tls["cert_id"], tls["cert"], tls["key"]


class FileRoutes:
    """Routes from a JSON file, re-read when it changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = None
        self.version = 0

    def changed(self) -> list[Route] | None:
        """The file's routes if it changed since the last call, else None."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise RoutesError(f"{self.path}: no such file") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._seen:
            return None
        try:
            routes = routes_from_json(json.loads(self.path.read_text()))
        except (OSError, ValueError) as exc:
            self._seen = stamp  # said once, not every second
            raise RoutesError(f"{self.path}: {exc}") from None
        self._seen = stamp
        self.version += 1
        return routes


class RoutesAway(Exception):
    """The API did not answer with the routing table (it is away, or refused the token)."""


class ApiRoutes:
    """The routing table through the API, with this balancer's host-scoped token: no ledger
    credentials (DESIGN.md, "Trust boundaries").

    `fetch(after, position)` is one request: the API answers once the routes projector has
    applied `position` (a relay's wake-up), with the routes only if routes_version moved past
    `after`. The last table is cached on disk, so a balancer restarted while the API is away
    still routes instead of answering 404 for every app."""

    def __init__(self, api: str, token: str, balancer_id: str,
                 cache: str | Path | None = None, timeout: float = 5.0) -> None:
        self.url = f"{api.rstrip('/')}/balancers/{balancer_id}/routing"
        self.token, self.timeout = token, timeout
        self.cache = Path(cache) if cache else None
        self._local = threading.local()

    def fetch(self, after: int,
              position: int = 0) -> tuple[list[Route], int, dict[str, Any]] | None:
        """The routes, their version and the table as read (for `keep`, once the routes
        are in force) if the version moved past `after`, else None. RoutesAway when the API
        does not give them (the caller keeps the routes it has)."""
        import requests

        try:
            reply = self._http().get(self.url, params={"after": after, "position": position},
                                      timeout=self.timeout)
            doc = reply.json()
        except (requests.RequestException, ValueError) as exc:
            self.close()
            raise RoutesAway(f"the API at {self.url} does not answer ({exc})") from None
        if reply.status_code != 200 or not isinstance(doc, dict):
            message = doc.get("message", "") if isinstance(doc, dict) else ""
            raise RoutesAway(f"the API refused the routing table: {reply.status_code} "
                             f"{message}")
        if not doc.get("changed"):
            return None
        return routes_from_json(doc), int(doc["version"]), doc

    def post_stats(self, samples: list[dict[str, Any]]) -> None:
        """Send router samples (balancer/metrics.py) for `tally stats`; RoutesAway if they
        were not stored (the caller sends them again with the next ones)."""
        import requests

        url = self.url.rsplit("/", 1)[0] + "/stats"
        try:
            reply = self._http().post(url, json={"samples": samples}, timeout=self.timeout)
        except requests.RequestException as exc:
            self.close()
            raise RoutesAway(f"the API at {url} does not answer ({exc})") from None
        if reply.status_code != 200:
            raise RoutesAway(f"the API refused router samples: {reply.status_code} "
                             f"{reply.text[:200]}")

    def fetch_slug(self, app: str, release: int, destination: Path) -> None:
        """Download a release's slug to `destination` (the caller checks its digest)."""
        import requests

        url = self.url.split("/balancers/", 1)[0] + f"/apps/{app}/releases/{release}/slug"
        try:
            with self._http().get(url, stream=True, timeout=self.timeout) as reply:
                if reply.status_code != 200:
                    raise RoutesAway(f"the API refused the slug of {app} v{release}: "
                                     f"{reply.status_code}")
                with open(destination, "wb") as out:
                    for chunk in reply.iter_content(1 << 20):
                        out.write(chunk)
        except requests.RequestException as exc:
            self.close()
            raise RoutesAway(f"the API at {url} does not answer ({exc})") from None

    def keep(self, doc: dict[str, Any]) -> None:
        """Write the table to the cache file (atomically)."""
        if self.cache is None:
            return
        tmp = self.cache.with_name(self.cache.name + ".tmp")
        try:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": doc["version"], "routes": doc["routes"]}))
            tmp.replace(self.cache)
        except OSError:
            pass  # a cache, not the truth: the ledger is

    def cached(self) -> tuple[list[Route], int] | None:
        """The routes last kept, if any (and readable)."""
        if self.cache is None:
            return None
        try:
            doc = json.loads(self.cache.read_text())
            return routes_from_json(doc), int(doc["version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _http(self) -> Any:
        """This thread's HTTP session with the API (thread-pool threads share none)."""
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["Authorization"] = f"Bearer {self.token}"
        return session

    def close(self) -> None:
        """Drop this thread's session (a fresh connection next time)."""
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()
            self._local.session = None
