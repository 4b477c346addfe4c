"""The API's I/O shell: a ledger connection per thread, the user directory kept fresh from
the ledger, and load-decide-append for app streams. Built by create_app, never at import."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from agents.stats import SampleStore
from api import auth, buildqueue
from api import hosts as host_fold
from api.auth import Directory, Principal
from api.buildqueue import Unbuilt
from api.errors import ApiError, Conflict, NotFound, Unauthorized
from api.heartbeats import Batcher
from api.hosts import Placements
from api.state import AppState, fold, summary
from ledger import NO_STREAM, Ledger, NewEvent, RecordedEvent, VersionConflict
from ledger.catalogue import APP_NAME
from ledger.events import AppendResult
from ledger.hostnames import PLATFORM_STREAM, current_suffix
from ledger.uids import DEFAULT_RANGE, UID_STREAM, NoUidLeft, next_uid
from ledger.vocabulary import LIVENESS_STREAM, liveness_of
from projectors.views import Projected, Views

APP_NAME_RE = re.compile(str(APP_NAME.regex.pattern))
"""The catalogue's app names (to the very end: the pattern ends in \\Z, not `$`)."""
log = logging.getLogger("tally.api")
APP_CACHE = 10_000
"""Folded app states kept per process; past this the cache starts over."""


class AddonBackups(Protocol):
    """What the API asks of the backups of apps' add-ons, a PostgreSQL database's dumps or
    a Redis's RDBs (`kind`: postgresql or redis; tally/addon_backups.py)."""

    def list(self, app: str, kind: str = "postgresql") -> list[dict[str, Any]]:
        """The app's backups of that kind, oldest first (agents/backups/state.py
        `Backup.as_dict` and `kind`)."""

    def capture(self, app: str, actor: str, kind: str = "postgresql") -> dict[str, Any]:
        """Back up the app's add-on now and verify it; the backup."""

    def final(self, app: str, kind: str = "postgresql") -> str | None:
        """The last backup before the add-on is dropped (None: there is nothing to back
        up); raises if it fails, so that nothing is dropped."""

    def restore(self, app: str, backup: dict[str, Any], actor: str,
                say: Callable[[str], None] = ...) -> None:
        """Restore the app's add-on from that backup (as `list` gave it), in place; `say`
        hears each step."""

    def file(self, app: str, backup: dict[str, Any]) -> Path:
        """Where the backup's file is."""


@dataclass(frozen=True)
class Settings:
    """Everything create_app needs; tally/config.py builds it from the environment."""

    dsn: str
    bundles_dir: Path
    max_bundle_bytes: int = 100 * 1024 * 1024
    auth_refresh_s: float = 1.0
    long_poll_max_s: float = 30.0
    long_poll_slots: int = 2
    """Requests that may long-poll at once in this process: each holds a worker thread for
    its wait, so beyond this many, event reads answer at once instead of waiting."""
    read_fresh_s: float = 0.1
    """Reads may answer from this process's fold of an app checked that recently: another
    worker's write shows within this bound (as with views, but far shorter). A write
    drops the bound for its app here, so a client reads its own write."""
    app_uids: tuple[int, int] = DEFAULT_RANGE
    """The Unix uids apps get, each once (ledger/uids.py)."""
    build_logs_dir: Path | None = None
    """Build output, one file per build (agents/builder.py writes them); None: none kept."""
    logs_tail: Callable[[str, int], list[str]] | None = None
    """An app's last log lines, where the log collector writes them (None: no logs)."""
    web_port: int | None = None
    """The balancers' public port: apps' URLs are http://<app>.<suffix>[:port]/."""
    logs_follow: Callable[[str, threading.Event], Iterator[str]] | None = None
    """The app's log lines from now on, and "" when a wait found none (for keep-alives)."""
    run_key: bytes | None = field(default=None, repr=False)
    """Signs the host agents' run tickets (ledger/tickets.py); None: no one-off runs."""
    seal_key: str | None = field(default=None, repr=False)
    """Seals the private keys of apps' certificates (ledger/tls.py); None: no certs:add."""
    run_slots: int = 8
    """Attached runs relayed at once by this process: each holds a worker thread for its
    whole length, so `tally serve api` gives the process this many threads more than the
    others need; past them, an attach is refused with a 503 that says so."""
    create_addon: Callable[[str, str, str], tuple[str, str]] | None = None
    """Makes an app's add-on: (kind, app, plan) -> (its URL, where it runs); refuses with
    Conflict if it exists (agents/addons.py, wired by tally/api_settings.py); None: no
    add-ons on this platform."""
    destroy_addon: Callable[[str, str], None] | None = None
    """Drops an app's add-on of a kind (database and role, or Redis): (kind, app);
    idempotent."""
    addon_backups: AddonBackups | None = None
    """Backups of apps' databases (agents/backups/, wired by tally/addon_backups.py); None:
    none on this platform."""
    heartbeat_batch_s: float = 0.1
    """Heartbeats are appended together once per this interval (api/heartbeats.py)."""
    hosts_fresh_s: float = 0.1
    """An agent's desired state is read from this process's placements fold checked at
    most this long ago (api/hosts.py)."""


class Refresher:
    """A thread of this process's own that runs `refresh` when poked (once per poke that
    finds it idle), so a request never waits for it. Started on first use in each process
    (gunicorn forks its workers after the app is built)."""

    def __init__(self, refresh: Callable[[], None], name: str) -> None:
        self.refresh, self.name = refresh, name
        self._wanted = threading.Event()
        self._pid = 0
        self._start = threading.Lock()

    def poke(self) -> None:
        if self._pid != os.getpid():
            with self._start:
                if self._pid != os.getpid():
                    threading.Thread(target=self._run, name=self.name, daemon=True).start()
                    self._pid = os.getpid()
        if not self._wanted.is_set():
            self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            try:
                self.refresh()
            except Exception:  # the next poke tries again; requests are not held meanwhile
                log.exception("%s: background refresh failed", self.name)


class Services:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._local = threading.local()
        self._lock = threading.Lock()
        self._directory = Directory()
        self._refreshed = 0.0
        self._forced = 0.0
        self._apps: dict[str, AppState] = {}
        self._checked: dict[str, float] = {}
        self.long_polls = threading.BoundedSemaphore(max(1, settings.long_poll_slots))
        self.views = Views(settings.dsn, "tally-api-views")
        """The projectors' views, on connections of their own (one per thread)."""
        self.projected = Projected(settings.dsn, "tally-api-projected")
        """Wakes the requests that wait for the projectors (a balancer's routing table)."""
        self._uid_lock = threading.Lock()
        self._uids_seen = 0
        self._uid_high: int | None = None
        """The allocations read (UID_STREAM's version), the highest uid of our range."""
        self.run_relays = threading.BoundedSemaphore(max(1, settings.run_slots))
        self._placements = Placements()
        self._placements_lock = threading.Lock()
        self._placements_at = 0.0
        self._refresher = Refresher(self._refresh_in_background, "placements")
        self._unbuilt = Unbuilt()
        self._unbuilt_lock = threading.Lock()
        self._unbuilt_at = 0.0
        self.heartbeats = Batcher(lambda: Ledger(settings.dsn, retry_deadline=2.0,
                                                 application_name="tally-api-heartbeats"),
                                  settings.heartbeat_batch_s, revoked=auth.revoked_tokens)

    @property
    def ledger(self) -> Ledger:
        """This thread's ledger connection (opened on first use)."""
        ledger = getattr(self._local, "ledger", None)
        if ledger is None:
            ledger = self._local.ledger = Ledger(self.settings.dsn, retry_deadline=5.0,
                                                 application_name="tally-api")
        return ledger

    @property
    def stats(self) -> SampleStore:
        """This thread's reader of the agents' stats samples."""
        store = getattr(self._local, "stats", None)
        if store is None:
            store = self._local.stats = SampleStore(self.settings.dsn, "tally-api-stats")
        return store

    def hosts(self) -> list[dict[str, Any]]:
        """The hosts view judged now, with the timings the placer announced."""
        liveness = liveness_of(self.ledger.read_stream(LIVENESS_STREAM))
        return self.views.hosts(datetime.now(UTC), liveness)

    # -- auth ------------------------------------------------------------------------------
    def directory(self, force: bool = False, asked: float | None = None) -> Directory:
        """Users and tokens, refreshed from the ledger at most every auth_refresh_s
        (or now, when forced: a token not seen yet may have just been issued). A forced
        refresh for a request that arrived at `asked` (monotonic) is skipped when another
        began since: it sequenced and read what was issued before the request."""
        with self._lock:
            now = time.monotonic()
            if force and asked is not None and self._forced >= asked:
                force = False
            if force or now - self._refreshed > self.settings.auth_refresh_s:
                head = self.ledger.sequence() if force else self.ledger.head()
                while batch := self.ledger.read_all(self._directory.position, upto=head,
                                                    categories=["user", "app"],
                                                    types=auth.FOLDED, limit=1000):
                    self._directory.apply(batch)
                # scanned up to the head: the next refresh starts there, not at the last
                # matching event (or every refresh would rescan all the events since)
                self._directory.position = max(self._directory.position, head)
                self._refreshed = now
                if force:
                    self._forced = now
            return self._directory

    def authenticate(self, header: str | None, revocation: bool = True) -> Principal:
        """The caller, by this process's directory of tokens; with `revocation`, also
        refused if its token was revoked since (one read). Without it the caller must see
        to that itself (heartbeats do, per batch: api/heartbeats.py)."""
        token = auth.bearer(header)
        asked = time.monotonic()
        who = (self.directory().lookup(token)
               or self.directory(force=True, asked=asked).lookup(token))
        if who is None or (revocation and self._revoked(who)):
            raise Unauthorized("unknown or revoked API token: run `tally login` again")
        return who

    def _revoked(self, who: Principal) -> bool:
        """Whether the caller's token was revoked after this process last refreshed its
        directory: one indexed read of the caller's stream past the version folded (empty
        almost always). A revocation appended by any worker is committed before its 204,
        so no worker accepts the token once the 204 is sent."""
        directory = self.directory()
        later = self.ledger.read_stream(f"user-{who.name}",
                                        directory.versions.get(who.name, 0) + 1)
        return directory.revoked_since(who, later)

    # -- hosts ---------------------------------------------------------------------------
    def placements(self, wait: bool = True) -> Placements:
        """The placements fold, caught up if last checked over hosts_fresh_s ago. It
        sequences first, as the placer does: hosts learn of placements with no relay up.
        Without `wait` (heartbeats), the fold as it is, and if it is stale a thread of this
        process's own catches it up: a heartbeat's reply then names the version of a moment
        ago (the next one says more) and no heartbeat waits on the ledger."""
        if not wait:
            if time.monotonic() - self._placements_at > self.settings.hosts_fresh_s:
                self._refresher.poke()
            return self._placements
        with self._placements_lock:
            self._refresh_placements()
            return self._placements

    def _refresh_placements(self) -> None:
        """Under _placements_lock: catch up if last checked over hosts_fresh_s ago."""
        now = time.monotonic()
        if now - self._placements_at > self.settings.hosts_fresh_s:
            self._catch_up(self._placements, host_fold.CATEGORIES, host_fold.TYPES)
            self._placements_at = now

    def _refresh_in_background(self) -> None:
        with self._placements_lock:
            self._refresh_placements()

    def unbuilt(self) -> Unbuilt:
        """The releases with no build outcome yet (api/buildqueue.py), caught up if last
        checked over hosts_fresh_s ago: what builders are offered."""
        with self._unbuilt_lock:
            now = time.monotonic()
            if now - self._unbuilt_at > self.settings.hosts_fresh_s:
                self._catch_up(self._unbuilt, buildqueue.CATEGORIES, buildqueue.TYPES)
                self._unbuilt_at = now
            return self._unbuilt

    def _catch_up(self, fold: Placements | Unbuilt, categories: list[str],
                  types: list[str]) -> None:
        """Apply to `fold` what the ledger holds past its position, sequencing first."""
        self.ledger.sequence()
        head = self.ledger.sequence()  # as the placer: no relay needed
        while batch := self.ledger.read_all(fold.position, limit=5000, upto=head,
                                            categories=categories, types=types):
            fold.apply(batch)
            if len(batch) < 5000:
                break
        fold.position = max(fold.position, head)  # scanned to here: start there

    # -- app streams -----------------------------------------------------------------------
    def load_app(self, name: str) -> AppState:
        """The app's state, folded onto this process's last fold of it (only the events
        since are read: an event-sourced aggregate without a snapshot store). A name no
        app can have is simply not found."""
        if not APP_NAME_RE.match(name):
            raise NotFound(f"no app named {name[:40]!r} (app names are 3-30 lowercase "
                           f"letters, digits and dashes)")
        cached = self._apps.get(name)
        after = cached.version if cached else 0
        checked = time.monotonic()
        state = fold(name, self.ledger.read_stream(f"app-{name}", after + 1), cached)
        if len(self._apps) >= APP_CACHE:
            self._apps.clear()
            self._checked.clear()
        self._apps[name] = state
        self._checked[name] = checked
        return state

    def read_app(self, name: str) -> AppState:
        """The app for a read: this process's fold if checked within read_fresh_s."""
        cached = self._apps.get(name)
        if cached is not None and (time.monotonic() - self._checked.get(name, 0.0)
                                   < self.settings.read_fresh_s):
            return cached
        return self.load_app(name)

    def suffix(self) -> str:
        """The platform's suffix, as the ledger says now (read when a name is claimed)."""
        return current_suffix((e.type, e.data) for e in self.ledger.read_stream(PLATFORM_STREAM))

    def allocate_uid(self, app: str, who: Principal) -> int:
        """The uid after the highest one of the range ever handed out, recorded
        (AppUidAllocated) before any app is created with it. Reads only the allocations
        made since this process last looked."""
        first, end = self.settings.app_uids
        for _ in range(10):
            with self._uid_lock:
                for e in self.ledger.read_stream(UID_STREAM, self._uids_seen + 1):
                    self._uids_seen = e.version
                    if first <= e.data["uid"] <= end:
                        self._uid_high = max(self._uid_high or 0, e.data["uid"])
                version, high = self._uids_seen, self._uid_high
            try:
                uid = next_uid(high, first, end)
            except NoUidLeft as exc:
                raise Conflict(str(exc)) from exc
            try:
                self.append(UID_STREAM, [NewEvent("AppUidAllocated", {"app": app, "uid": uid})],
                            version or NO_STREAM, who)
                return uid
            except VersionConflict:
                continue  # another worker handed one out meanwhile: read it, take the next
        raise Conflict("too many apps are being created at once: try again")

    def append(self, stream: str, events: list[NewEvent], expected: int | None,
               who: Principal, key: str | None = None) -> AppendResult:
        """Append with the actor in every event's metadata (and the caller's idempotency
        key, if any)."""
        meta = {"actor": who.name, "role": who.role}
        stamped = [NewEvent(e.type, e.data, {**e.metadata, **meta}) for e in events]
        return self.ledger.append(stream, stamped, expected_version=expected,
                                  idempotency_key=key)

    def command(self, name: str, who: Principal,
                decide: Callable[[AppState], list[NewEvent]],
                arrived: datetime | None = None) -> AppState:
        """Decide on the app as it was when the request arrived, append at that version.

        A concurrent change (recorded after `arrived`) makes this a 409 carrying the state
        the other writer left (if the caller may see it). This process's own fold of the
        app (kept current by its reads and writes) saves the read in the common case:
        the append's expected version checks it, and if it was merely behind (the newer
        events were recorded before the request arrived, by another worker), the request
        is decided again on the fresh state, exactly as a load at arrival would have.
        A refusal or a no-op decided on the kept fold is decided again on the fresh state."""
        arrived = arrived or datetime.now(UTC)
        kept, state = self._apps.get(name), None
        if kept is not None:
            try:
                events = decide(kept)
            except ApiError:
                events = []
            # A refusal or a no-op may only mean that the fold is behind: ask the ledger.
            if events:
                try:
                    return self._commit(kept, events, who)
                except VersionConflict as exc:
                    state = self.load_app(name)
                    if state.updated_at is None or state.updated_at >= arrived:
                        raise self._conflict(state, who, exc.actual) from exc
        state = state or self.load_app(name)
        return self.commit(state, decide(state), who)

    def commit(self, state: AppState, events: list[NewEvent], who: Principal) -> AppState:
        """Append events decided on `state` at its version; the app as it is after."""
        try:
            return self._commit(state, events, who)
        except VersionConflict as exc:
            raise self._conflict(self.load_app(state.name), who, exc.actual) from exc

    def _conflict(self, current: AppState, who: Principal, actual: int) -> Conflict:
        shown = ({"current": summary(current)}  # only to those who may see that app
                 if who.is_admin or current.may_manage(who.name) else {})
        return Conflict(f"app {current.name} was changed by someone else meanwhile "
                        f"(now at version {actual}); look and try again", **shown)

    def _commit(self, state: AppState, events: list[NewEvent], who: Principal) -> AppState:
        name = state.name
        if not events:
            return state
        stream = f"app-{name}"
        self._checked.pop(name, None)  # the next read of it here goes to the ledger
        result = self.append(stream, events, state.version, who)
        self._checked.pop(name, None)  # again: a read may have refreshed it meanwhile
        # Fold what we just wrote rather than read it back, with the ledger's clock.
        written = [RecordedEvent(None, id_, stream, version, e.type, e.data,
                                 {"actor": who.name}, at)
                   for e, id_, version, at in zip(events, result.event_ids, result.versions,
                                                  result.recorded_at, strict=True)]
        after = fold(name, written, state)
        if self._apps.get(name, state).version < after.version:
            self._apps[name] = after  # unless a read here has already gone further
        return after
