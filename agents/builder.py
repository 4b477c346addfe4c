"""The builder (`tally serve builder`): turn each release's bundle into a slug, once.

Each round it folds the ledger (apps and builds), asks agents/buildplan.py what is
buildable, and claims a build by appending BuildStarted at the version of the release's
build stream it read: of several builders exactly one wins. While it builds it renews the
claim (BuildClaimRenewed, at its own last version); a builder that dies stops renewing, the
lease runs out, and another builder claims the build again. A renewal that conflicts means
the claim was lost: that build is abandoned, its outcome is the other builder's to say.

The build itself runs in the sandbox (agents/sandbox.py) on a copy of the bundle, its
output written line by line to $TALLY_HOME/builds/<app>/<stream>.log (what `tally deploy`
streams and `tally builds:output` shows), and ends in BuildSucceeded (the slug stored
beside the bundles) or BuildFailed (why, and the last lines).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import shutil
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agents import bundle, sandbox, slug, unpacker
from agents.buildplan import Job, jobs
from agents.fleet import Fleet
from agents.loop import every_wakeup
from agents.placer import catch_up
from ledger import NO_STREAM, Ledger, LedgerUnavailable, NewEvent, VersionConflict
from ledger.archives import ArchiveRefused, guarded
from ledger.uids import DEFAULT_RANGE, build_uid

log = logging.getLogger("tally.builder")
CATEGORIES = ["app", "build"]
RESERVED = {"PATH", "HOME", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "TMPDIR", "LD_PRELOAD",
            "LD_LIBRARY_PATH", "PIP_CACHE_DIR"}
"""Config vars a build does not take from the app (they would break the sandbox's setup)."""
TAIL = 30


@dataclass(frozen=True)
class Settings:
    builder_id: str
    bundles: Path
    """Where bundles are, and where slugs go (content-addressed, side by side)."""
    logs: Path
    """Build output, one file per build: $TALLY_HOME/builds."""
    work: Path
    """Build folders and per-app caches; must not be inside TALLY_HOME (the sandbox's user
    has to reach its folders, and must reach nothing else)."""
    limits: sandbox.Limits = sandbox.Limits()
    lease_s: float = 30.0
    network: str = "host"
    concurrency: int = 1
    app_uids: tuple[int, int] = DEFAULT_RANGE
    """The apps' uid range (TALLY_APP_UIDS): builds run in the range just above it."""


class ClaimLost(Exception):
    """Another builder holds the build now."""


class Builder:
    def __init__(self, ledger: Ledger, settings: Settings,
                 clock: type[datetime] = datetime) -> None:
        self.ledger, self.s = ledger, settings
        self.fleet = Fleet()
        sandbox.preflight()
        self.pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="build")
        self.running: dict[str, Future] = {}
        self.lock = threading.Lock()
        for d in (settings.work, settings.work / "builds", settings.work / "cache"):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, 0, 0)
            d.chmod(0o711)  # build users pass through to their own folders only
        self.buildpack = settings.work / "buildpack.py"
        shutil.copyfile(Path(__file__).with_name("buildpack.py"), self.buildpack)
        self.buildpack.chmod(0o644)
        self.index = sandbox.index_paths(dict(os.environ))

    def run(self, stop: threading.Event, relays: list[str] | tuple[str, ...] = (),
            interval: float = 1.0) -> None:
        try:
            every_wakeup(self.reconcile, stop, relays, interval, log)
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def reconcile(self) -> None:
        """Claim what is buildable while there is room; give earlier slugs at once."""
        catch_up(self.ledger, self.fleet, CATEGORIES, sequence=True)
        for stream, future in list(self.running.items()):
            if future.done():
                del self.running[stream]
                if (exc := future.exception()) is not None:
                    log.error("the build of %s crashed: %r", stream, exc, exc_info=exc)
        for job in jobs(self.fleet, datetime.now(UTC)):
            if job.stream in self.running:
                continue
            if job.reuse is not None:
                self.reuse(job)
                continue
            if len(self.running) >= self.s.concurrency:
                continue
            try:
                self.append(job.stream, [NewEvent("BuildStarted", {
                    "app": job.app, "release": job.release, "builder": self.s.builder_id,
                    "lease_s": self.s.lease_s, "attempt": job.attempt})],
                    job.expected_version)
            except VersionConflict:
                log.info("%s v%s: another builder claimed it", job.app, job.release)
                continue
            log.info("building %s v%s (attempt %s)", job.app, job.release, job.attempt)
            self.running[job.stream] = self.pool.submit(self.build, job,
                                                        job.expected_version + 1)

    def reuse(self, job: Job) -> None:
        old = job.reuse
        assert old is not None
        try:
            self.append(job.stream, [
                NewEvent("BuildStarted", {"app": job.app, "release": job.release,
                                          "builder": self.s.builder_id,
                                          "lease_s": self.s.lease_s, "attempt": job.attempt}),
                NewEvent("BuildSucceeded", {"app": job.app, "release": job.release,
                                            "slug_digest": old.build.slug_digest,
                                            "size_bytes": old.build.size_bytes,
                                            "seconds": 0.0, "reused_from": old.release})],
                job.expected_version)
            log.info("%s v%s runs the slug of v%s (same code)", job.app, job.release,
                     old.release)
        except VersionConflict:
            pass

    def append(self, stream: str, events: list[NewEvent], expected: int) -> None:
        with self.lock:  # one connection, shared by the loop and the build threads
            self.ledger.append(stream, events, expected or NO_STREAM)

    # --- one build (a worker thread) ------------------------------------------------------

    def build(self, job: Job, version: int) -> None:
        started = time.monotonic()
        claim = _Claim(self, job, version)
        output = self.s.logs / job.app / f"{job.stream}.log"
        output.parent.mkdir(parents=True, exist_ok=True)
        tail: collections.deque[str] = collections.deque(maxlen=TAIL)
        folder = self.s.work / "builds" / f"{job.stream}-{uuid.uuid4().hex[:8]}"
        try:
            if job.app_uid is None:
                raise sandbox.SandboxUnavailable(f"app {job.app} has no uid (created before "
                                                 "apps had one): create it again")
            user = sandbox.build_user(build_uid(job.app_uid, *self.s.app_uids))
            with open(output, "w") as out, self._app_cache(job.app, user) as cache:
                def line(text: str) -> None:
                    text = text.replace("\x00", "\\0")  # JSON in the ledger holds no NUL
                    tail.append(text)
                    out.write(text + "\n")
                    out.flush()

                result = self._sandboxed(job, folder, cache, user, line, claim.renew_if_due)
                claim.renew_if_due(force=True)
                if result.stopped or result.code != 0:
                    reason = result.stopped or _reason(result.code, tail)
                    line(f" !     build failed: {reason}")
                    self._outcome(claim, "BuildFailed", {
                        "reason": reason[:2000], "log_tail": [t[:500] for t in tail],
                        "seconds": round(time.monotonic() - started, 2)})
                    return
                line("-----> Compressing the slug")
                digest, size = slug.pack(folder / "app", self.s.bundles)
                seconds = round(time.monotonic() - started, 2)
                line(f"-----> Slug {digest[:12]}: {size / 2**20:.1f} MB, built in {seconds} s")
                self._outcome(claim, "BuildSucceeded", {"slug_digest": digest,
                                                        "size_bytes": size,
                                                        "seconds": seconds})
        except ClaimLost:
            log.warning("%s v%s: the claim was lost, abandoning the build", job.app,
                        job.release)
        except (bundle.BundleRefused, sandbox.SandboxUnavailable, OSError) as exc:
            with contextlib.suppress(ClaimLost, LedgerUnavailable):
                self._outcome(claim, "BuildFailed", {
                    "reason": f"the builder could not build it: {exc}"[:2000],
                    "log_tail": list(tail), "seconds": round(time.monotonic() - started, 2)})
        finally:
            remove(folder)

    def _outcome(self, claim: _Claim, type_: str, data: dict) -> None:
        job = claim.job
        try:
            self.append(job.stream, [NewEvent(type_, {"app": job.app, "release": job.release,
                                                      **data})], claim.version)
        except VersionConflict as exc:
            raise ClaimLost(str(exc)) from exc
        log.info("%s v%s: %s %s", job.app, job.release, type_, data.get("reason", ""))

    @contextlib.contextmanager
    def _app_cache(self, app: str, user: sandbox.BuildUser):  # type: ignore[no-untyped-def]
        """The app's build cache, its build uid's alone (0700), one build at a time on this
        machine. A cache another uid owns (an app of the same name deleted and created
        again, or a builder of before per-app uids) is thrown away, not handed over."""
        cache = self.s.work / "cache" / app
        with open(self.s.work / "cache" / f".{app}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if cache.exists() and cache.lstat().st_uid != user.uid:
                remove(cache)
            cache.mkdir(mode=0o700, exist_ok=True)
            os.chown(cache, user.uid, user.gid)
            cache.chmod(0o700)
            yield cache

    def _sandboxed(self, job: Job, folder: Path, cache: Path, user: sandbox.BuildUser,
                   line: Callable[[str], None], tick: Callable[[], None]) -> sandbox.Outcome:
        line(f"-----> Building {job.app} v{job.release} (bundle {job.bundle_digest[:12]})")
        return sandboxed_build(self.s.bundles / f"{job.bundle_digest}.tar.gz",
                               job.bundle_digest, folder, cache, dict(job.config),
                               self.buildpack, self.index, user, self.s, line, tick)


def sandboxed_build(bundle_path: Path, digest: str, folder: Path, cache: Path,
                    config: dict[str, str], buildpack: Path, index: list[Path],
                    user: sandbox.BuildUser, s: Settings, line: Callable[[str], None],
                    tick: Callable[[], None] = lambda: None) -> sandbox.Outcome:
    """Build one bundle in `folder` (made here; its `app` is the slug's content after)."""
    app_dir, tmp = folder / "app", folder / "tmp"
    folder.mkdir(mode=0o711)
    app_dir.mkdir()
    tmp.mkdir()
    extract_bundle(bundle_path, digest, app_dir, (user.uid, user.gid))
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/app", "LANG": "C.UTF-8",
           "TMPDIR": "/tmp", "PYTHONUNBUFFERED": "1",
           **{k: v for k, v in config.items() if k not in RESERVED},
           **{k: v for k, v in os.environ.items() if k in sandbox.PIP_ENV}}
    spec = sandbox.Spec(["/usr/bin/python3", "/tally/buildpack.py"], app_dir, tmp, cache, env,
                        ((buildpack, "/tally/buildpack.py"), *((p, str(p)) for p in index)),
                        s.network, s.limits)
    return sandbox.run(spec, user, folder.name, line, tick)


class _Claim:
    """The build's claim, renewed every third of its lease from the build's thread."""

    def __init__(self, builder: Builder, job: Job, version: int) -> None:
        self.builder, self.job, self.version = builder, job, version
        self.next = time.monotonic() + builder.s.lease_s / 3

    def renew_if_due(self, force: bool = False) -> None:
        if not force and time.monotonic() < self.next:
            return
        self.next = time.monotonic() + self.builder.s.lease_s / 3
        try:
            self.builder.append(self.job.stream, [NewEvent("BuildClaimRenewed", {
                "app": self.job.app, "release": self.job.release,
                "builder": self.builder.s.builder_id})], self.version)
        except VersionConflict as exc:
            raise ClaimLost(str(exc)) from exc
        self.version += 1


def _reason(code: int | None, tail: Iterable[str]) -> str:
    """Why a build failed, in one line: the buildpack's own ` !` line, with the last error
    line of the tool that failed (pip's `ERROR: ...`) when there is one."""
    lines = list(tail)
    said = [t.removeprefix(" !").strip() for t in lines if t.startswith(" !")]
    errors = [t.strip() for t in lines if t.lstrip().startswith(("ERROR:", "error:"))]
    if said:
        return f"{said[-1]}: {errors[-1]}" if errors else said[-1]
    return f"the build exited with status {code}" if code is not None else "the build was killed"


def extract_bundle(path: Path, digest: str, into: Path,
                   owner: tuple[int, int] | None) -> None:
    """The bundle, checked again (the builder trusts no one), into the build folder, unpacked
    by the build's own uid (agents/unpacker.py), never by root."""
    if not path.exists():
        raise bundle.BundleRefused(f"bundle {digest[:12]} is not in the bundle store")
    if bundle.digest_of(path) != digest:
        raise bundle.BundleRefused(f"bundle {digest[:12]} does not match its digest")
    try:
        with tarfile.open(path, "r:gz") as tar:  # headers only: the guard
            bundle.check_members(list(guarded(tar, path.stat().st_size)))
        unpacker.unpack_as(path, into, owner, links="inside")
    except (ArchiveRefused, unpacker.UnpackRefused) as exc:
        raise bundle.BundleRefused(f"unsafe bundle: {exc}") from exc
    except (tarfile.TarError, EOFError) as exc:
        raise bundle.BundleRefused(f"the bundle is not a valid tar.gz: {exc}") from exc


def remove(folder: Path) -> None:
    """A build folder, whatever modes the build left on it (root needs none)."""
    shutil.rmtree(folder, ignore_errors=True)


def default_id() -> str:
    return f"{os.uname().nodename}-{os.getpid()}"

