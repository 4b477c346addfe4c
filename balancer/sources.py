"""Where routes come from: the ledger's routes view, or a JSON file (standalone mode).

Plain blocking code with no eventlet in it: the shell calls the ledger reader in a thread
pool (eventlet.tpool), so a slow database never stalls requests.

The file holds `{"routes": [{"hostname": "blog.example.com", "app": "blog",
"backends": ["127.0.0.1:8001"], "maintenance": false}, ...]}` (or just the list); it is
read again whenever its modification time, size or inode change. A file that does not parse
keeps the routes in force (and says why on stderr): a typo must not take every app down.
"""

from __future__ import annotations

import json
import os
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
                            bool(item.get("https_only", False)), hsts))
    return routes


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


class LedgerRoutes:
    """The routes view, read with the narrowest role (tally_reader).

    `status()` is one cheap query (the routes projector's checkpoint and routes_version);
    the rows are read only when the version moved."""

    def __init__(self, dsn: str, cache: str | Path | None = None) -> None:
        self.dsn = dsn
        self.cache = Path(cache) if cache else None
        self._conn: Any = None

    def keep(self, routes: list[Route], version: int) -> None:
        """Write the routes to the cache file (atomically), for a restart while the ledger
        is away: a balancer restarted then still routes instead of answering 404."""
        if self.cache is None:
            return
        doc = {"version": version, "routes": [
            {"hostname": r.hostname, "app": r.app, "backends": list(r.backends),
             "maintenance": r.maintenance} for r in routes]}
        tmp = self.cache.with_name(self.cache.name + ".tmp")
        try:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc))
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

    def _cursor(self) -> Any:
        import psycopg2

        if self._conn is None or self._conn.closed:
            self._conn = psycopg2.connect(self.dsn, application_name="tally-balancer")
            self._conn.autocommit = True
        return self._conn.cursor()

    def _run(self, query: str) -> list[tuple]:
        import psycopg2

        try:
            with self._cursor() as cur:
                cur.execute(query)
                return cur.fetchall()
        except psycopg2.Error:
            self.close()  # reconnect next time (a failover, a restart)
            raise

    def status(self) -> tuple[int, int]:
        """(position the routes projector has applied, routes_version)."""
        rows = self._run(
            "SELECT (SELECT position FROM views.projector_checkpoints WHERE name = 'routes'),"
            " (SELECT version FROM views.routes_version WHERE id = 1)")
        checkpoint, version = rows[0]
        return checkpoint or 0, version or 0

    def routes(self) -> tuple[list[Route], int]:
        """Every route and the version they make up, read in one snapshot."""
        rows = self._run(
            "SELECT v.version, r.hostname, r.app, r.backends, r.maintenance FROM"
            " (SELECT max(version) AS version FROM views.routes_version) v"
            " LEFT JOIN views.routes r ON true")
        version = rows[0][0] or 0
        return [Route(h, a, tuple(b or ()), bool(m)) for _, h, a, b, m in rows
                if h is not None], version

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
