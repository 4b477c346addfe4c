"""The backup agent's work, one run at a time: claim it in the ledger, take it, record it,
verify it, prune what retention no longer keeps. Every step is an event in
`backup-<target>` (BackupStarted, BackupCompleted, BackupVerified, BackupFailed,
BackupPruned).

Exactly once, whoever runs: a scheduled run is claimed by appending BackupStarted with the
key `backup:<target>:<scheduled time>`; of two agents firing the same job, the second
append finds the key and that agent stands aside. While it works the runner holds a session
advisory lock named by the backup; a runner killed -9 loses its session, hence the lock,
so `recover` (at every start) knows a started backup nobody holds is orphaned: a complete
base backup is verified again (the run resumes), anything else is recorded as failed and
its partial files removed. Never a half backup counted as good: only BackupVerified counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2

from agents import redisaddon
from agents.backups import base, dumps, gfs, verify, walcheck
from agents.backups.base import BackupError, LoggedProgress, Progress
from agents.backups.repository import Repository
from agents.backups.scratch import clear
from agents.backups.state import TYPES, Backup, finals, fold, retention_view, stream_of
from agents.backups.walcheck import wal_segment
from agents.bundle import digest_of
from ledger import Ledger, LedgerError, NewEvent
from ledger.cluster import Cluster

log = logging.getLogger("tally.backups")
LOCK_CLASS = 15015
"""First key of the backups' advisory locks (two-int form: apart from the sequencer's)."""
LEDGER = "ledger"


def addon_target(app: str) -> str:
    return f"addon:{app}"


def redis_target(app: str) -> str:
    return f"redis:{app}"


def lock_key(backup_id: str) -> int:
    return int.from_bytes(hashlib.sha256(backup_id.encode()).digest()[:4], "big",
                          signed=True)


def new_backup_id(target: str, scheduled_for: str | None, now: datetime) -> str:
    """`ledger-20261206T0900Z` for a scheduled run (the same in every agent), with a random
    tail for a capture by hand."""
    name = target.replace(":", "-")
    if scheduled_for:
        return f"{name}-{datetime.fromisoformat(scheduled_for):%Y%m%dT%H%M%SZ}"
    return f"{name}-{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


class BackupAgent:
    """Takes, checks and prunes backups of the ledger and of the apps' databases."""

    def __init__(self, cluster: Cluster, repo: Repository, scratch_root: Path,
                 policy: gfs.Policy, apps_cluster: Cluster | None = None,
                 agent_id: str | None = None, max_rate: str | None = None,
                 progress: Progress | None = None,
                 keep_final: timedelta = timedelta(days=30),
                 redis_dir: Path | None = None, dsn: str | None = None) -> None:
        """`dsn`: the ledger to record in, when it is not `cluster`'s on this machine
        (the API's, for add-on backups taken by the API)."""
        self.cluster = cluster
        self.redis_dir = redis_dir
        self.apps_cluster = apps_cluster
        self.repo = repo
        self.scratch_root = scratch_root
        self.policy = policy
        self.agent_id = agent_id or f"{socket.gethostname()}:{os.getpid()}"
        self.max_rate = max_rate
        self.progress = progress
        self.keep_final = keep_final
        self.dsn = dsn or cluster.dsn("tally_writer")

    # -- the ledger's record ---------------------------------------------------------------
    def ledger(self) -> Ledger:
        return Ledger(self.dsn, retry_deadline=30, application_name="tally-backups")

    def backups(self, ledger: Ledger) -> dict[str, Backup]:
        ledger.sequence()
        return fold(ledger.read_all(types=TYPES, limit=None))

    def record(self, ledger: Ledger, target: str, type_: str, **data: Any) -> None:
        ledger.append(stream_of(target), [NewEvent(type_, {"target": target, **data},
                                                   {"actor": "backups"})])

    def claim(self, ledger: Ledger, target: str, backup_id: str, job: str,
              scheduled_for: str | None, reason: str) -> bool:
        """Record BackupStarted; False if another run (in this agent or another) claimed
        this scheduled run. A duplicate carrying this call's own run id is this call's
        append retried after a lost connection: still ours."""
        key = f"backup:{target}:{scheduled_for}" if scheduled_for else f"backup:{backup_id}"
        runner = f"{self.agent_id}/{secrets.token_hex(4)}"
        result = ledger.append(stream_of(target), [NewEvent("BackupStarted", {
            "backup_id": backup_id, "target": target, "job": job,
            "scheduled_for": scheduled_for, "agent": runner, "reason": reason},
            {"actor": "backups"})], idempotency_key=key)
        if not result.duplicate:
            return True
        first = ledger.read_stream(stream_of(target), result.versions[0], limit=1)
        return bool(first) and first[0].data.get("agent") == runner

    @contextmanager
    def claimed(self, ledger: Ledger, target: str, backup_id: str, job: str,
                scheduled_for: str | None, reason: str) -> Iterator[bool]:
        """Take the backup's advisory lock, then claim it; yields whether this run is
        ours. The lock is held until the work ends (and released if we die), and taken
        before the claim, so `recover` never finds a claimed backup unlocked while its
        runner lives."""
        lock = self._try_lock(backup_id)
        if lock is None:
            yield False  # another agent runs this very backup
            return
        try:
            yield self.claim(ledger, target, backup_id, job, scheduled_for, reason)
        finally:
            lock.close()

    @contextmanager
    def scratch_held(self, name: str) -> Iterator[str]:
        """A scratch check's folder name, under the advisory lock named by it while the
        check runs: `recover` (here or in another agent) clears only folders whose lock
        is free."""
        lock = self._try_lock(name)
        try:
            yield name
        finally:
            if lock is not None:
                lock.close()

    def _try_lock(self, backup_id: str) -> Any:
        conn = psycopg2.connect(self.dsn, application_name="tally-backups-lock")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s, %s)",
                        (LOCK_CLASS, lock_key(backup_id)))
            row = cur.fetchone()
            if row is not None and row[0]:
                return conn
        conn.close()
        return None

    # -- the ledger's base backups ---------------------------------------------------------
    def run_ledger(self, scheduled_for: str | None = None, job: str = LEDGER,
                   reason: str = "scheduled") -> str | None:
        """One base backup of the ledger, checked, then retention; its id, or None if
        another agent had claimed this run."""
        backup_id = new_backup_id(LEDGER, scheduled_for, datetime.now(UTC))
        with self.ledger() as ledger:
            with self.claimed(ledger, LEDGER, backup_id, job, scheduled_for, reason) as mine:
                if not mine:
                    log.info("%s: claimed by another run", backup_id)
                    return None
                log.info("%s: base backup started", backup_id)
                try:
                    position = ledger.sequence()
                    progress = self.progress or LoggedProgress(f"{backup_id}: base backup",
                                                               log)
                    taken = base.take(self.cluster, self.repo, backup_id, position, progress,
                                      self.max_rate)
                except (BackupError, OSError, LedgerError) as exc:
                    self._failed(ledger, LEDGER, backup_id, str(exc), "backup")
                    return backup_id
                self.record(ledger, LEDGER, "BackupCompleted", backup_id=backup_id,
                            size_bytes=taken.size_bytes, location=taken.location,
                            digest=taken.manifest_sha256, duration_s=taken.duration_s,
                            position=taken.position, timeline=taken.timeline,
                            start_lsn=taken.start_lsn, end_lsn=taken.end_lsn)
                log.info("%s: %d bytes in %.1fs, verifying", backup_id, taken.size_bytes,
                         taken.duration_s)
                self.verify_ledger(ledger, backup_id, asdict(taken))
            self.prune(ledger, LEDGER)
        return backup_id

    def verify_ledger(self, ledger: Ledger, backup_id: str, completed: dict) -> bool:
        """Check a stored base backup; BackupVerified (and a sidecar in the repository,
        for restores without the ledger) or BackupFailed with its files removed."""
        try:
            self._archive_whole_since(completed)
            checked = verify.verify(self.cluster, self.repo.base(backup_id), self.scratch_root,
                                    backup_id)
        except (BackupError, OSError) as exc:
            self._failed(ledger, LEDGER, backup_id, str(exc), "verify")
            return False
        now = datetime.now(UTC).isoformat()
        sidecar = {**completed, "backup_id": backup_id, "verified": asdict(checked),
                   "verified_at": now, "finished_at": completed.get("finished_at") or now}
        path = self.repo.base_dir / f"{backup_id}.json"
        path.write_text(json.dumps(sidecar, indent=1))
        path.chmod(0o600)
        self.record(ledger, LEDGER, "BackupVerified", backup_id=backup_id,
                    position=checked.position, events=checked.events,
                    events_digest=checked.sha256, seconds=checked.seconds)
        log.info("%s: verified (%d events up to position %d)", backup_id, checked.events,
                 checked.position)
        return True

    def _archive_whole_since(self, completed: dict) -> None:
        """BackupError if the WAL archive misses a segment after the backup's start: a
        point-in-time recovery from it would stop there."""
        if not completed.get("start_lsn"):
            return
        since = wal_segment(completed["timeline"], completed["start_lsn"])
        if missing := walcheck.gaps(self.repo.wal_segments(), since):
            raise BackupError(f"the WAL archive misses {', '.join(map(str, missing))} after "
                              f"this backup's start ({since}): a point-in-time recovery "
                              f"from it would stop there")

    def check_wal(self, ledger: Ledger) -> list[walcheck.Gap]:
        """Look for segments missing from the archive since the oldest held base backup;
        each gap found is recorded once (WalGapFound, naming the backups whose
        point-in-time range it cuts) and logged."""
        found = walcheck.cuts(self.repo.wal_segments(), starts(self.backups(ledger).values()))
        for gap, cut in found:
            result = ledger.append(stream_of(LEDGER), [NewEvent("WalGapFound", {
                "backup_id": cut[-1], "target": LEDGER, "first": gap.first,
                "last": gap.last, "cut": cut}, {"actor": "backups"})],
                idempotency_key=f"walgap:{gap.first}")
            if not result.duplicate:
                log.error("the WAL archive misses %s: point-in-time recovery from %s stops "
                          "before it", gap, ", ".join(cut))
        return [gap for gap, _cut in found]

    def _failed(self, ledger: Ledger, target: str, backup_id: str, error: str,
                stage: str) -> None:
        log.warning("%s: %s failed: %s", backup_id, stage, error)
        self.remove(target, backup_id)
        self.record(ledger, target, "BackupFailed", backup_id=backup_id, error=error[:2000],
                    stage=stage)

    def remove(self, target: str, backup_id: str) -> None:
        if target == LEDGER:
            self.repo.remove(backup_id)
            (self.repo.base_dir / f"{backup_id}.json").unlink(missing_ok=True)
        else:
            kind, app = target.split(":", 1)
            path = (self.repo.rdb if kind == "redis" else self.repo.dump)(app, backup_id)
            for file in (path, path.with_suffix(".partial")):
                file.unlink(missing_ok=True)

    # -- retention ---------------------------------------------------------------------------
    def prune(self, ledger: Ledger, target: str) -> list[str]:
        """Remove what GFS no longer keeps (only after a newer backup was verified), then
        the WAL no retained base backup needs."""
        backups = self.backups(ledger)
        gone = gfs.prunable(retention_view(backups.values(), target), self.policy)
        for backup_id in gone:
            self.remove(target, backup_id)
            self.record(ledger, target, "BackupPruned", backup_id=backup_id,
                        reason="not kept by retention " + policy_text(self.policy))
            log.info("%s: pruned", backup_id)
        if target == LEDGER:
            self.prune_wal([b for b in backups.values() if b.target == LEDGER
                            and b.state in ("completed", "verified")
                            and b.backup_id not in gone])
        return gone

    def prune_wal(self, held: list[Backup]) -> list[str]:
        """Remove archived WAL older than the oldest held base backup's start (timeline
        history files stay). Nothing while no backup is held."""
        firsts = starts(held).values()
        if not firsts:
            return []
        oldest = min(s[8:] for s in firsts)
        gone = [n for n in self.repo.wal_segments()
                if not n.endswith(".history") and n[8:24] < oldest]
        for name in gone:
            (self.repo.wal_dir / name).unlink(missing_ok=True)
        return gone

    # -- add-on databases ----------------------------------------------------------------------
    def redis_apps(self) -> list[str]:
        """Apps with a Redis add-on on this machine."""
        return redisaddon.apps(self.redis_dir) if self.redis_dir else []

    def addon_apps(self) -> list[str]:
        """Apps with a PostgreSQL add-on: their databases in the apps cluster."""
        if self.apps_cluster is None or not self.apps_cluster.initialized():
            return []
        c = self.apps_cluster
        conn = psycopg2.connect(c.node_dsn(c.primary(), "postgres", "postgres"))
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'app\\_%' "
                            "ORDER BY 1")
                return [r[0].removeprefix("app_").replace("_", "-") for r in cur.fetchall()]
        finally:
            conn.close()

    def run_addons(self, scheduled_for: str | None = None, job: str = "addons",
                   reason: str = "scheduled") -> list[str]:
        """A dump of every app's database, then final backups past their period; the ids
        this agent took."""
        taken = [bid for app in self.addon_apps()
                 if (bid := self.run_addon(app, scheduled_for, job, reason))]
        taken += [bid for app in self.redis_apps()
                  if (bid := self.run_redis(app, scheduled_for, job, reason))]
        self.prune_finals(datetime.now(UTC))
        return taken

    def prune_finals(self, now: datetime) -> list[str]:
        """Prune the final backups (of destroyed add-ons) older than `keep_final`."""
        with self.ledger() as ledger:
            backups = self.backups(ledger)
            gone = gfs.expired(finals(backups.values()), now, self.keep_final)
            for backup_id in gone:
                target = backups[backup_id].target
                self.remove(target, backup_id)
                self.record(ledger, target, "BackupPruned", backup_id=backup_id,
                            reason=f"a final backup kept {self.keep_final}")
        return gone

    def run_addon(self, app: str, scheduled_for: str | None = None, job: str = "addons",
                  reason: str = "capture") -> str | None:
        """pg_dump -Fc of the app's database, checked by pg_restore --list, then restored
        on a scratch server (dumps.verify_restore) before it counts."""
        assert self.apps_cluster is not None
        apps = self.apps_cluster

        def check(path: Path) -> None:
            dumps.check(apps, path)
            # a short folder name: the server's socket path must stay < 108 bytes
            with self.scratch_held(f"dump-{secrets.token_hex(4)}") as name:
                dumps.verify_restore(apps, app, path, self.scratch_root, name)

        return self._file_backup(addon_target(app), lambda bid: self.repo.dump(app, bid),
                                 lambda path: dumps.dump(apps, app, path), check,
                                 scheduled_for, job, reason)

    def run_redis(self, app: str, scheduled_for: str | None = None, job: str = "addons",
                  reason: str = "capture") -> str | None:
        """An RDB of the app's Redis (`redis-cli --rdb` as its backup user), checked whole
        by redis-check-rdb, then loaded by a scratch redis-server before it counts."""
        assert self.redis_dir is not None
        root = self.redis_dir

        def take(path: Path) -> None:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            try:
                redisaddon.copy_rdb(root, app, partial)
            except (redisaddon.RedisError, subprocess.SubprocessError) as exc:
                partial.unlink(missing_ok=True)
                raise BackupError(str(exc)) from exc
            partial.chmod(0o600)
            os.replace(partial, path)

        def check(path: Path) -> int:
            # beside the servers (the redis user passes there), a short name (the socket's
            # path stays < 108 bytes)
            try:
                with self.scratch_held(f"{redisaddon.CHECK_PREFIX}"
                                       f"{secrets.token_hex(4)}") as name:
                    return redisaddon.verify_rdb(path, root / name)
            except (redisaddon.RedisError, subprocess.SubprocessError, OSError) as exc:
                raise BackupError(str(exc)) from exc

        return self._file_backup(redis_target(app), lambda bid: self.repo.rdb(app, bid), take,
                                 check, scheduled_for, job, reason)

    def _file_backup(self, target: str, where: Callable[[str], Path],
                     take: Callable[[Path], None], check: Callable[[Path], int | None],
                     scheduled_for: str | None, job: str, reason: str) -> str | None:
        """One add-on's backup as a file: claimed, taken, recorded, checked, then pruned
        by the GFS rule; the id, or None when another agent has this run."""
        backup_id = new_backup_id(target, scheduled_for, datetime.now(UTC))
        with self.ledger() as ledger:
            with self.claimed(ledger, target, backup_id, job, scheduled_for, reason) as mine:
                if not mine:
                    return None
                started = time.monotonic()
                path = where(backup_id)
                log.info("%s: started (%s)", backup_id, reason)
                try:
                    take(path)
                except (BackupError, OSError, LedgerError) as exc:
                    self._failed(ledger, target, backup_id, str(exc), "backup")
                    return backup_id
                log.info("%s: %.1f MB in %.1fs, verifying", backup_id,
                         path.stat().st_size / 1e6, time.monotonic() - started)
                self.record(ledger, target, "BackupCompleted", backup_id=backup_id,
                            size_bytes=path.stat().st_size,
                            location=str(path.relative_to(self.repo.root)),
                            digest=digest_of(path),
                            duration_s=round(time.monotonic() - started, 3))
                try:
                    held = check(path)  # what it holds, if the check counts it
                except BackupError as exc:
                    self._failed(ledger, target, backup_id, str(exc), "verify")
                    return backup_id
                self.record(ledger, target, "BackupVerified", backup_id=backup_id,
                            seconds=round(time.monotonic() - started, 3), events=held)
                log.info("%s: verified", backup_id)
            self.prune(ledger, target)
        return backup_id

    def restore_addon(self, app: str, backup_id: str | None = None,
                      actor: str = "operator") -> str:
        """Restore the app's database from its backup (default: the newest verified);
        returns the backup's id."""
        assert self.apps_cluster is not None
        apps = self.apps_cluster
        return self._restore(addon_target(app), "database", backup_id, actor,
                             lambda chosen: dumps.restore_dump(apps, app, chosen))

    def restore_redis(self, app: str, backup_id: str | None = None, actor: str = "operator",
                      launch: redisaddon.Launch | None = None,
                      say: redisaddon.Say = lambda _line: None) -> str:
        """Restore the app's Redis from one of its RDBs (default: the newest verified),
        in place; returns the backup's id. `say` hears each step."""
        assert self.redis_dir is not None
        root = self.redis_dir

        def load(chosen: Path) -> None:
            try:
                redisaddon.restore_rdb(root, app, chosen, launch, say)
            except (redisaddon.RedisError, subprocess.SubprocessError) as exc:
                raise BackupError(str(exc)) from exc

        return self._restore(redis_target(app), "Redis", backup_id, actor, load)

    def _restore(self, target: str, what: str, backup_id: str | None, actor: str,
                 load: Callable[[Path], None]) -> str:
        """Load a verified backup of an add-on whose file is still what was recorded (its
        sha256); BackupRestored records who restored what, and how long it took."""
        app = target.split(":", 1)[1]
        with self.ledger() as ledger:
            good = [b for b in self.backups(ledger).values()
                    if b.target == target and b.state == "verified"]
            chosen = [b for b in good if backup_id in (None, b.backup_id)]
            if not chosen:
                raise BackupError(f"no verified backup {backup_id} of {app}'s {what}"
                                  if backup_id else f"{app}'s {what} has no verified backup")
            b = chosen[-1]
            path = self.repo.root / (b.completed or {}).get("location", "")
            if not path.is_file() or digest_of(path) != (b.completed or {}).get("digest"):
                raise BackupError(f"{b.backup_id}'s file is missing or not what was recorded "
                                  f"(sha256): not restored")
            started = time.monotonic()
            load(path)
            self.record(ledger, target, "BackupRestored", backup_id=b.backup_id,
                        actor=actor[:200], size_bytes=path.stat().st_size,
                        seconds=round(time.monotonic() - started, 3))
        return b.backup_id

    # -- after a crash -------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Settle every backup whose runner is gone: verify a complete base backup again,
        record anything else as failed and remove its files; stop and remove scratch
        servers nobody runs. Returns the ids settled."""
        settled = []
        with self.ledger() as ledger:
            for b in self.backups(ledger).values():
                if b.finished:
                    continue
                lock = self._try_lock(b.backup_id)
                if lock is None:
                    continue  # its runner is alive (here or in another agent)
                try:
                    self.clear_scratch(b.backup_id)
                    if (b.target == LEDGER and b.completed is not None
                            and self.repo.base(b.backup_id).exists()):
                        log.info("%s: its agent stopped before the check; checking now",
                                 b.backup_id)
                        self.verify_ledger(ledger, b.backup_id, b.completed)
                    else:
                        self._failed(ledger, b.target, b.backup_id,
                                     "the backup agent stopped during the backup (killed or "
                                     "crashed); its partial files were removed", "recovery")
                    settled.append(b.backup_id)
                finally:
                    lock.close()
        for folder in self.scratch_root.iterdir() if self.scratch_root.is_dir() else ():
            lock = self._try_lock(folder.name)
            if lock is not None:  # a check whose runner is gone
                self.clear_scratch(folder.name)
                lock.close()
        for folder in redisaddon.checks(self.redis_dir) if self.redis_dir else ():
            lock = self._try_lock(folder.name)
            if lock is not None:  # an RDB's check whose runner is gone
                redisaddon.clear_check(folder)
                lock.close()
        return settled

    def clear_scratch(self, name: str) -> None:
        clear(self.scratch_root / name, self.cluster.spec.bin_dir, self.cluster.spec.os_user)


def starts(backups: Iterable[Backup]) -> dict[str, str]:
    """The first WAL segment of each held base backup of the ledger, by id."""
    return {b.backup_id: wal_segment(b.completed["timeline"], b.completed["start_lsn"])
            for b in backups if b.target == LEDGER and b.state in ("completed", "verified")
            and b.completed and b.completed.get("start_lsn")}


def policy_text(policy: gfs.Policy) -> str:
    return ",".join(f"{k}={v}" for k, v in asdict(policy).items())
