"""The builder (`tally serve builder`): turn each release's bundle into a slug, once.

A builder is a fleet host: it holds no ledger credentials and reads no bundle store. It
speaks only to the API, with its builder token (api/routes_builders.py; DESIGN.md, "Trust
boundaries"). Each round it asks the API what awaits a build and claims one: the API
appends BuildStarted at the version of the release's build stream it read, so of several
builders exactly one wins (the others get a 409 and move on); a release of code built
before gets that slug at its claim, without a build. While it builds it renews the claim
every lease/3; a builder that dies stops renewing, the lease runs out, and another
builder claims the build again (the next attempt). A renewal refused means the claim was
lost: that build is abandoned, its outcome is the other builder's to say.

The build itself runs in the sandbox (agents/sandbox.py), as the app's own build uid, on
the bundle fetched from the API; its output goes to the API line by line every second
(what `tally deploy` streams and `tally builds:output` shows). It ends with the slug
uploaded (BuildSucceeded, within the app's slug_mb quota) or BuildFailed (why, and the
last lines).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import shutil
import stat
import tarfile
import threading
import time
import urllib.error
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agents import buildnet, bundle, netrules, sandbox, slug, unpacker
from agents.api_client import ApiAway, ApiError, ApiRefused, BuilderApi
from ledger.archives import ArchiveRefused, guarded

log = logging.getLogger("tally.builder")
RESERVED = {"PATH", "HOME", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "TMPDIR", "LD_PRELOAD",
            "LD_LIBRARY_PATH", "PIP_CACHE_DIR"}
"""Config vars a build does not take from the app (they would break the sandbox's setup)."""
TAIL = 30
T = TypeVar("T")
PENDING_MAX = 4 << 20
"""Output kept for the API while it is away (characters)."""


@dataclass(frozen=True)
class Settings:
    work: Path
    """Build folders, per-app caches and fetched bundles; must not be inside TALLY_HOME
    (a build's uid has to reach its folders, and must reach nothing else)."""
    limits: sandbox.Limits = sandbox.Limits()
    lease_s: float = 30.0
    network: str = "index"
    """index: the host's network, confined to the package index by nftables
    (agents/buildnet.py; the host's, with a warning, where nftables cannot be used);
    host: the host's; none: no network at all."""
    concurrency: int = 1
    index_hosts: tuple[str, ...] = ()
    """Hosts of indexes builds may reach, besides PyPI's and those pip is configured with."""


@dataclass(frozen=True)
class Job:
    """A claimed build, as the API handed it over."""

    app: str
    release: int
    attempt: int
    bundle_digest: str
    config: dict[str, str]
    build_uid: int | None
    slug_max_bytes: int

    @classmethod
    def of(cls, claim: dict[str, Any]) -> Job:
        return cls(claim["app"], claim["release"], claim["attempt"], claim["bundle_digest"],
                   dict(claim["config"]), claim.get("build_uid"), claim["slug_max_bytes"])


class ClaimLost(Exception):
    """Another builder holds the build now."""


class Builder:
    def __init__(self, api: BuilderApi, settings: Settings) -> None:
        self.api, self.s = api, settings
        sandbox.preflight()
        self.pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="build")
        self.running: dict[tuple[str, int], Future] = {}
        work = (settings.work, settings.work / "builds", settings.work / "cache")
        for d in work:
            d.mkdir(parents=True, exist_ok=True, mode=0o711)
        for d in work:  # checked once made: another user may have made one meanwhile
            check_root_owned(d)
            d.chmod(0o711)  # build uids pass through to their own folders only
        self.downloads = settings.work / "bundles"
        self.downloads.mkdir(mode=0o700, exist_ok=True)
        self.buildpack = settings.work / "buildpack.py"
        shutil.copyfile(Path(__file__).with_name("buildpack.py"), self.buildpack)
        self.buildpack.chmod(0o644)
        self.index = sandbox.index_paths(dict(os.environ))
        self.net: buildnet.BuildNet | None = None
        self.unconfined = ""
        """Why builds cannot be confined to the index when asked to be: then none runs."""
        if settings.network == "index":
            try:
                self.net = buildnet.for_builder(buildnet.index_hosts(
                    dict(os.environ), sandbox.PIP_CONFIGS, settings.index_hosts))
            except netrules.Unavailable as exc:
                self.unconfined = str(exc)
                log.error("builds cannot be confined to the package index (%s): every "
                          "build fails until they can (or run with --network none)", exc)

    def run(self, stop: threading.Event, interval: float = 0.5) -> None:
        try:
            while not stop.is_set():
                try:
                    self.reconcile()
                except ApiError as exc:
                    log.warning("the API did not answer as expected, retrying: %s", exc)
                stop.wait(interval)
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            if self.net is not None:
                self.net.remove()

    def reconcile(self) -> None:
        """Claim what awaits a build while there is room."""
        for key, future in list(self.running.items()):
            if future.done():
                del self.running[key]
                if (exc := future.exception()) is not None:
                    log.error("the build of %s v%s crashed: %r", *key, exc, exc_info=exc)
        if len(self.running) >= self.s.concurrency:
            return
        for offer in self.api.queue():
            key = (offer["app"], offer["release"])
            if key in self.running:
                continue
            if len(self.running) >= self.s.concurrency:
                break
            try:
                claim = self.api.claim(*key, self.s.lease_s)
            except ApiRefused as exc:
                log.info("%s v%s: not claimed: %s", *key, exc)
                continue
            if claim.get("reused_from") is not None:
                log.info("%s v%s runs the slug of v%s (same code)", *key, claim["reused_from"])
                continue
            log.info("building %s v%s (attempt %s)", *key, claim["attempt"])
            self.running[key] = self.pool.submit(self.build, Job.of(claim))

    # --- one build (a worker thread) ------------------------------------------------------

    def build(self, job: Job) -> None:
        started = time.monotonic()
        claim = _Claim(self.api, job, self.s.lease_s)
        out = _Output(self.api, job)
        folder = self.s.work / "builds" / f"{job.app}-{job.release}-{uuid.uuid4().hex[:8]}"

        patience = 4 * self.s.lease_s  # past the lease: a claim taken over answers 409

        def fail(reason: str) -> None:
            out.line(f" !     build failed: {reason}")
            _until_answered(lambda: out.flush(strict=True), patience)
            seconds = round(time.monotonic() - started, 2)
            _until_answered(lambda: self.api.failed(
                job.app, job.release, job.attempt, reason[:2000],
                [t[:500] for t in out.tail], seconds), patience)
            log.info("%s v%s: BuildFailed %s", job.app, job.release, reason)

        try:
            try:
                user = self._user(job)
                def tick() -> None:
                    claim.renew_if_due()
                    out.flush()
                result = self._sandboxed(job, user, folder, out.line, tick)
                claim.renew_if_due(force=True)
                if result.stopped or result.code != 0:
                    fail(result.stopped or _reason(result.code, out.tail))
                    return
                out.line("-----> Compressing the slug")
                digest, size = slug.pack(folder / "app", folder / "slug",
                                         (user.uid, user.gid))
                if size > job.slug_max_bytes:
                    fail(f"the slug is {size / 2**20:.1f} MB, over the app's slug_mb quota of "
                         f"{job.slug_max_bytes / 2**20:.0f} MB (leave files out with "
                         ".slugignore, or ask an admin: tally admin quota)")
                    return
                seconds = round(time.monotonic() - started, 2)
                out.line(f"-----> Slug {digest[:12]}: {size / 2**20:.1f} MB, built in "
                         f"{seconds} s")
                _until_answered(lambda: out.flush(strict=True), patience)
                with open(folder / "slug" / f"{digest}.tar.gz", "rb") as f:
                    _until_answered(lambda: self.api.upload_slug(
                        job.app, job.release, job.attempt, seconds, f), patience)
                log.info("%s v%s: BuildSucceeded %s", job.app, job.release, digest[:12])
            except (bundle.BundleRefused, sandbox.SandboxUnavailable, OSError) as exc:
                fail(f"the builder could not build it: {exc}")
        except ClaimLost as exc:
            log.warning("%s v%s: the claim was lost, abandoning the build: %s", job.app,
                        job.release, exc)
        except ApiRefused as exc:  # e.g. 409 at the outcome: another builder took it over
            log.warning("%s v%s: the API refused: %s", job.app, job.release, exc)
        except ApiAway as exc:  # the lease runs out; this or another builder takes it again
            log.error("%s v%s: the API is away, leaving the build to its lease: %s", job.app,
                      job.release, exc)
        finally:
            remove(folder)
            with contextlib.suppress(FileNotFoundError):
                (self.downloads / f"{job.bundle_digest}.tar.gz").unlink()

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

    def _fetch(self, job: Job) -> Path:
        """The build's bundle from the API; ApiAway when it does not answer (or answers
        5xx), so a restart of the API does not fail the build."""
        try:
            return bundle.download(self.api.base, self.api.token, job.app, job.release,
                                   job.bundle_digest, self.downloads,
                                   kind=f"build/bundle?attempt={job.attempt}")
        except bundle.BundleRefused as exc:
            cause = exc.__cause__
            if isinstance(cause, urllib.error.HTTPError) and cause.code < 500:
                raise
            if isinstance(cause, OSError):
                raise ApiAway(str(exc)) from exc
            raise

    def _user(self, job: Job) -> sandbox.BuildUser:
        """The build's uid, its network confined to the index first (when asked)."""
        if job.build_uid is None:
            raise sandbox.SandboxUnavailable(f"app {job.app} has no uid (it was created before "
                                             "apps had one): create it again")
        user = sandbox.build_user(job.build_uid)
        if self.unconfined:
            raise sandbox.SandboxUnavailable(
                f"builds here may reach only the package index, and nftables cannot confine "
                f"them ({self.unconfined}): an operator must fix that or run the builder with "
                f"--network none")
        if self.net is not None:
            try:
                self.net.confine(user.uid)
            except netrules.Unavailable as exc:  # never build unconfined when asked not to
                raise sandbox.SandboxUnavailable(f"cannot confine the build's network: "
                                                 f"{exc}") from exc
        return user

    def _sandboxed(self, job: Job, user: sandbox.BuildUser, folder: Path,
                   line: Callable[[str], None], tick: Callable[[], None]) -> sandbox.Outcome:
        line(f"-----> Building {job.app} v{job.release} (bundle {job.bundle_digest[:12]})")
        path = _until_answered(lambda: self._fetch(job), 4 * self.s.lease_s)
        with self._app_cache(job.app, user) as cache:
            return sandboxed_build(path, job.bundle_digest, folder, cache, job.config,
                                   self.buildpack, self.index, user, self.s, line, tick)


def sandboxed_build(bundle_path: Path, digest: str, folder: Path, cache: Path,
                    config: dict[str, str], buildpack: Path, index: list[Path],
                    user: sandbox.BuildUser, s: Settings, line: Callable[[str], None],
                    tick: Callable[[], None] = lambda: None) -> sandbox.Outcome:
    """Build one bundle in `folder` (made here; its `app` is the slug's content after)."""
    app_dir, tmp = folder / "app", folder / "tmp"
    folder.mkdir(mode=0o711)
    app_dir.mkdir(mode=0o700)  # the build uid's alone: another tenant's source is in it
    tmp.mkdir(mode=0o700)
    extract_bundle(bundle_path, digest, app_dir, (user.uid, user.gid))
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/app", "LANG": "C.UTF-8",
           "TMPDIR": "/tmp", "PYTHONUNBUFFERED": "1",
           **{k: v for k, v in config.items() if k not in RESERVED},
           **{k: v for k, v in os.environ.items() if k in sandbox.PIP_ENV}}
    spec = sandbox.Spec(["/usr/bin/python3", "/tally/buildpack.py"], app_dir, tmp, cache, env,
                        ((buildpack, "/tally/buildpack.py"), *((p, str(p)) for p in index)),
                        "none" if s.network == "none" else "host", s.limits)
    return sandbox.run(spec, user, folder.name, line, tick)


class _Claim:
    """The build's claim, renewed every third of its lease from the build's thread."""

    def __init__(self, api: BuilderApi, job: Job, lease_s: float) -> None:
        self.api, self.job, self.lease_s = api, job, lease_s
        self.next = time.monotonic() + lease_s / 3

    def renew_if_due(self, force: bool = False) -> None:
        if not force and time.monotonic() < self.next:
            return
        try:
            self.api.renew(self.job.app, self.job.release, self.job.attempt)
        except ApiRefused as exc:
            raise ClaimLost(str(exc)) from exc
        except ApiAway as exc:  # tried again at the next tick; the lease has room for it
            log.warning("renewing the claim of %s v%s: %s", self.job.app, self.job.release,
                        exc)
            return
        self.next = time.monotonic() + self.lease_s / 3


class _Output:
    """The build's output: kept as a tail here, sent to the API every flush (every second
    while the build runs). Lines come from the sandbox's reader thread."""

    def __init__(self, api: BuilderApi, job: Job) -> None:
        self.api, self.job = api, job
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL)
        self.pending: list[str] = []
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        text = text.replace("\x00", "\\0")  # JSON in the ledger holds no NUL
        with self.lock:
            self.tail.append(text)
            self.pending.append(text + "\n")

    def flush(self, strict: bool = False) -> None:
        """Send what is pending. With the API away it is kept for the next flush (at most
        PENDING_MAX, its oldest dropped) and the build goes on; `strict`: ApiAway then."""
        with self.lock:
            text, self.pending = "".join(self.pending), []
        while text:
            chunk = text[:1 << 19]
            try:
                self.api.output(self.job.app, self.job.release, self.job.attempt, chunk)
            except ApiAway as exc:
                with self.lock:
                    self.pending.insert(0, text[-PENDING_MAX:])
                if strict:
                    raise
                log.warning("the API is away, the output of %s v%s is kept for later: %s",
                            self.job.app, self.job.release, exc)
                return
            except ApiRefused as exc:
                raise ClaimLost(str(exc)) from exc
            text = text[1 << 19:]


def _until_answered(call: Callable[[], T], patience: float) -> T:
    """`call` again while the API is away (a restart, a failover), for `patience` seconds:
    the claim outlives a short absence, so a finished build is not built again."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return call()
        except ApiAway as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("the API is away, trying again for up to %.0f s: %s",
                        deadline - time.monotonic(), exc)
            time.sleep(1.0)  # no event to wait on: the API says nothing while away


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


def check_root_owned(work: Path) -> None:
    """Refuse a work folder that another user made or could swap: root follows paths
    under it (chown, truncate) for every build, so each part of it that exists must be a
    real folder owned by root. An app that made /var/tmp/tally-builds before the builder
    came would otherwise own where root writes."""
    for part in (work, *work.parents):
        try:
            st = part.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            raise sandbox.SandboxUnavailable(
                f"{part} is not a folder of root's: refusing to build under it (remove it, "
                "or set TALLY_BUILD_DIR elsewhere)")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise sandbox.SandboxUnavailable(
                f"{part} may be changed by other users: refusing to build under it (set "
                "TALLY_BUILD_DIR elsewhere)")


def remove(folder: Path) -> None:
    """A build folder, whatever modes the build left on it (root needs none)."""
    shutil.rmtree(folder, ignore_errors=True)
