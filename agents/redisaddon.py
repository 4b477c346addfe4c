"""The Redis add-on: one redis-server per app (Debian's), so no app can name, list or evict
another's keys, whatever commands it sends; Celery's broker works unchanged in it.

Each instance: its own port from the platform's range (TALLY_REDIS_PORTS), bound to
127.0.0.1; the default user off and one ACL user whose password is in REDIS_URL only, with
every command but the @admin ones (CONFIG, DEBUG, SAVE, SHUTDOWN, MONITOR, REPLICAOF, ACL,
MODULE: with CONFIG SET dir a client could write files as the server's user) and MIGRATE
(it would make the server a client of any port on the machine); the plan's
memory limit and eviction policy; AOF persistence (appendfsync everysec). It runs as
Debian's `redis` user (refused if a root platform has none; as ours when not root),
its folder `<redis_dir>/<app>` 0700 to that user
holds its config (0600: the password), data and log. Under `tally up` each server is a
program of supervisord (`launch`: a killed one comes back); without it, a detached child.
The agents' network rules let an app reach only the ports of its own `*_URL` vars
(agents/netrules.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from ledger.catalogue import ADDON_PLANS
from ledger.cluster import pid_alive
from ledger.patroni import Process, writes_pid

USER = "redis"
ACL_USER = "app"
_CHILDREN: list[subprocess.Popen[bytes]] = []
"""Servers started here, kept so they are reaped (not warned about) when they end."""


class RedisError(Exception):
    """The Redis add-on could not be made or run; the message says why."""


def folder(root: Path, app: str) -> Path:
    return root / app


BACKUP_USER = "tally-backup"
"""The ACL user the backup agent copies an RDB as (`redis-cli --rdb`): SYNC and nothing
else; its password in `backup.key` (0600, root's) beside the config."""


def server_config(app_dir: Path, port: int, password: str, plan: str,
                  backup_password: str) -> str:
    """redis.conf for one app's instance. Its disk is bounded by its memory: the data set
    by `maxmemory` (past it, with noeviction, a write fails "OOM command not allowed"),
    the append-only file by its rewrite (once it is twice its last rewrite's size, past
    64 MiB), no RDB snapshots; CONFIG (-@admin) is refused to the app."""
    limits = ADDON_PLANS["redis"][plan]
    return f"""# tally: the Redis add-on of one app
bind 127.0.0.1
port {port}
protected-mode yes
daemonize no
dir {app_dir}
logfile {app_dir / "redis.log"}
user default off
user {ACL_USER} on >{password} ~* &* +@all -@admin -migrate
user {BACKUP_USER} on >{backup_password} +sync +replconf +ping
maxmemory {limits["maxmemory_mb"]}mb
maxmemory-policy {limits["policy"]}
appendonly yes
appendfsync everysec
auto-aof-rewrite-percentage 100
auto-aof-rewrite-min-size 64mb
save ""
"""


def _owner() -> tuple[int, int] | None:
    """The uid and gid a server runs as: Debian's `redis` when we are root (a tenant's
    server never runs as root), None when we are not root (it runs as us)."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        raise RedisError(f"there is no {USER!r} user to run Redis as (install Debian's "
                         "redis-server): a tenant's Redis never runs as root") from None
    return user.pw_uid, user.pw_gid


def _ports_taken(root: Path) -> set[int]:
    taken = set()
    for conf in root.glob("*/port"):  # a .gone-* one's port too, until it is removed
        with contextlib.suppress(ValueError, OSError):
            taken.add(int(conf.read_text()))
    return taken


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


Launch = Callable[[], None]
"""Has a supervisor run every server of `root` as it now is (apps()): tally/platform.py."""


def create(root: Path, app: str, plan: str, ports: tuple[int, int],
           launch: Launch | None = None) -> tuple[str, str]:
    """Make and start the app's Redis (by `launch` if given, else detached); its
    REDIS_URL and where it runs. Refused if the app has one already."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o711)
    with open(root / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        app_dir = folder(root, app)
        if app_dir.exists():
            raise RedisError(f"{app} already has a redis ({app_dir})")
        taken = _ports_taken(root)
        port = next((p for p in range(ports[0], ports[1] + 1)
                     if p not in taken and _free(p)), None)
        if port is None:
            raise RedisError(f"no free port left for Redis in {ports[0]}-{ports[1]}")
        password, backup_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        app_dir.mkdir(mode=0o700)
        conf = app_dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(server_config(app_dir, port, password, plan, backup_password))
        key = os.open(app_dir / "backup.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(key, "w") as f:
            f.write(backup_password)
        (app_dir / "port").write_text(str(port))
        if owner := _owner():
            for path in (app_dir, conf):
                os.chown(path, *owner)
    try:
        start(root, app, launch=launch)
    except RedisError:
        destroy(root, app, launch)
        raise
    return f"redis://{ACL_USER}:{password}@127.0.0.1:{port}/0", f"127.0.0.1:{port}"


def _pid(app_dir: Path) -> int | None:
    """The server's pid from its pid file, if that process is a redis-server of the app's
    owner: the file is the server user's to write, and root signals what it names."""
    try:
        pid = int((app_dir / "redis.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not pid_alive(pid):
        return None
    try:
        proc = psutil.Process(pid)
        uid, name = proc.uids().real, proc.name()
    except psutil.Error:
        return None
    owner = app_dir.stat().st_uid
    return pid if uid == owner and name.startswith("redis-server") else None


def process(root: Path, app: str) -> Process:
    """The app's server as a supervisor runs it: it records its pid, then is redis-server."""
    app_dir = folder(root, app)
    argv = [shutil.which("redis-server") or "/usr/bin/redis-server",
            str(app_dir / "redis.conf")]
    user = USER if _owner() else None
    return Process(f"redis-{app}", writes_pid(app_dir / "redis.pid", argv), user, {})


def processes(root: Path) -> list[Process]:
    return [process(root, app) for app in apps(root)]


def pid(root: Path, app: str) -> int | None:
    """The pid of the app's running server, if any."""
    return _pid(folder(root, app))


def start(root: Path, app: str, timeout: float = 30.0, launch: Launch | None = None) -> None:
    """Start the app's instance unless it runs (by `launch` if given); wait until it
    answers."""
    app_dir = folder(root, app)
    proc = None
    if launch is not None:
        launch()
    elif _pid(app_dir) is None:
        owner = _owner()
        proc = subprocess.Popen(process(root, app).argv, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=app_dir,
                                start_new_session=True, user=owner[0] if owner else None,
                                group=owner[1] if owner else None)
        _CHILDREN[:] = [p for p in _CHILDREN if p.poll() is None] + [proc]
    port = int((app_dir / "port").read_text())
    deadline = time.monotonic() + timeout
    while _free(port) or not _answers(port):
        if proc is not None and proc.poll() is not None:
            raise RedisError(f"redis-server for {app} exited ({proc.returncode}): see "
                             f"{app_dir / 'redis.log'}")
        if time.monotonic() > deadline:
            raise RedisError(f"redis-server for {app} did not answer within {timeout:.0f}s: "
                             f"see {app_dir / 'redis.log'}")
        time.sleep(0.05)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def stop(root: Path, app: str, timeout: float = 30.0) -> None:
    """SIGTERM (Redis writes its AOF and exits), SIGKILL after `timeout`."""
    app_dir = folder(root, app)
    pid = _pid(app_dir)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    _reap(pid)


def _reap(pid: int) -> None:
    """Wait for a server this process started (it is our child): no zombie is left."""
    for child in _CHILDREN:
        if child.pid == pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(10)


def destroy(root: Path, app: str, launch: Launch | None = None) -> bool:
    """Stop the app's Redis and remove its data: its password opens nothing after.
    Idempotent; True if there was one. Under a supervisor (`launch`), its program is
    removed first (renamed out of apps(), the supervisor's new table has it no more)."""
    app_dir = folder(root, app)
    if not app_dir.exists():
        return False
    gone = app_dir.with_name(f".gone-{app}-{secrets.token_hex(4)}")
    app_dir.rename(gone)
    if launch is not None:
        launch()
    pid = _pid(gone)
    if pid is not None:  # a detached one (or the supervisor's, if it could not stop it)
        os.kill(pid, signal.SIGKILL)
        _reap(pid)
    shutil.rmtree(gone, ignore_errors=True)
    return True


def copy_rdb(root: Path, app: str, into: Path, timeout: float = 600.0) -> None:
    """A point-in-time RDB of the app's server into `into` (`redis-cli --rdb`, as the
    backup user), checked whole by redis-check-rdb. RedisError saying why not."""
    app_dir = folder(root, app)
    try:  # the folder is the redis user's: never follow its link, nor read its file
        key = _backup_key(app_dir)
        port = int((app_dir / "port").read_text())
    except (OSError, ValueError) as exc:
        raise RedisError(f"{app}'s Redis has no backup user (made before backups: destroy "
                         f"and create it again): {exc}") from None
    env = {**os.environ, "REDISCLI_AUTH": key}
    for argv in (["redis-cli", "-h", "127.0.0.1", "-p", str(port), "--user", BACKUP_USER,
                  "--rdb", str(into)], ["redis-check-rdb", str(into)]):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                              cwd="/")
        if proc.returncode != 0:
            said = (proc.stderr or proc.stdout).strip().splitlines()
            raise RedisError(f"{argv[0]} failed: {' | '.join(said[-3:])}")


def _backup_key(app_dir: Path) -> str:
    """The backup user's password, read by root without following a link, and only from
    a file root owns (the folder is the redis user's, which could swap in a link to a
    root-only file and be handed it as the password)."""
    fd = os.open(app_dir / "backup.key", os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        if os.fstat(f.fileno()).st_uid != os.geteuid():
            raise OSError("backup.key is not ours")
        return f.read().strip()


AOF_DIR = "appendonlydir"
"""Redis 7's multi-part AOF folder in the server's `dir`: a manifest naming a base file
(RDB or AOF) and the increments after it. With AOF on, a server loads this, never
dump.rdb; so a restore installs the RDB as the base of a new AOF folder."""
Say = Callable[[str], None]


def restore_rdb(root: Path, app: str, rdb: Path, launch: Launch | None = None,
                say: Say = lambda _line: None, timeout: float = 600.0) -> int:
    """Replace the app's Redis data with the RDB at `rdb` (checked by redis-check-rdb
    first): the server is stopped (its supervisor first lets it go: the app leaves
    apps() while a marker is held), the RDB becomes the base of a new AOF folder, the
    server starts and loads it. The data it held before is kept until the new data
    answers, and put back if it does not. Returns the keys the RDB holds."""
    app_dir = folder(root, app)
    if not (app_dir / "redis.conf").exists():
        raise RedisError(f"{app} has no Redis")
    with open(root / f".restore-{app}.lock", "a") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RedisError(f"a restore of {app}'s Redis is under way") from None
        return _restore(root, app, rdb, launch, say, timeout)


def _restore(root: Path, app: str, rdb: Path, launch: Launch | None, say: Say,
             timeout: float) -> int:
    app_dir = folder(root, app)
    keys = _check_rdb(rdb)
    say(f"checked the RDB: {keys} keys, {rdb.stat().st_size / 1e6:,.1f} MB")
    marker = _restoring(root, app)
    marker.touch(mode=0o600)
    try:
        say(f"stopping {app}'s Redis")
        if launch is not None:
            launch()  # the supervisor's table has it no more: stopped, not restarted
        stop(root, app)
        _install(app_dir, rdb, say)
    except BaseException:
        marker.unlink(missing_ok=True)
        start(root, app, launch=launch)
        raise
    marker.unlink()
    say(f"starting {app}'s Redis and loading {keys} keys")
    try:
        start(root, app, timeout, launch)
        _loaded(app_dir, timeout)
    except RedisError:
        say("the restored data did not load: putting the data it held back")
        _put_back(root, app, launch)
        raise
    _remove_tree(app_dir, AOF_DIR + ".before")
    return keys


def settle_restores(root: Path) -> list[str]:
    """After a restore that was killed (its process gone, so its lock free): the app's
    data as the restore left it made whole again and its marker removed, so apps() has
    it again (the caller starts it). A new AOF folder that was complete stays (it was
    installed by a rename); one half built is removed; if the old one was moved aside and
    the new one never put in place, the old one comes back. The apps settled."""
    settled = []
    for marker in sorted(root.glob(".restoring-*")) if root.is_dir() else ():
        app = marker.name.removeprefix(".restoring-")
        with open(root / f".restore-{app}.lock", "a") as held:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a restore runs
            app_dir = folder(root, app)
            if app_dir.is_dir():
                _remove_tree(app_dir, f"{AOF_DIR}.restore")
                dir_fd = os.open(app_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    try:
                        os.stat(AOF_DIR, dir_fd=dir_fd, follow_symlinks=False)
                    except FileNotFoundError:  # the old one aside, the new one not in place
                        with contextlib.suppress(FileNotFoundError):
                            os.rename(AOF_DIR + ".before", AOF_DIR, src_dir_fd=dir_fd,
                                      dst_dir_fd=dir_fd)
                finally:
                    os.close(dir_fd)
            marker.unlink(missing_ok=True)
            settled.append(app)
    return settled


def _restoring(root: Path, app: str) -> Path:
    """The marker (root's, in the root folder) that keeps an app out of apps() while its
    Redis is restored."""
    return root / f".restoring-{app}"


def _check_rdb(rdb: Path) -> int:
    return _rdb_counts(rdb)[0]


def _rdb_counts(rdb: Path) -> tuple[int, int]:
    """redis-check-rdb's (keys read, keys with an expiry); RedisError if it refuses."""
    proc = subprocess.run(["redis-check-rdb", str(rdb)], capture_output=True, text=True,
                          timeout=600, cwd="/")
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise RedisError(f"redis-check-rdb refused the backup: {' | '.join(said[-3:])}")
    counts = {}
    for line in proc.stdout.splitlines():  # "[offset 58] Checksum OK" ... "[info] 3 keys read"
        words = line.split("]")[-1].split()
        if len(words) >= 2 and words[0].isdigit():
            counts[" ".join(words[1:])] = int(words[0])
    return counts.get("keys read", 0), counts.get("expires", 0)


def verify_rdb(rdb: Path, scratch: Path, timeout: float = 600.0) -> int:
    """Load the RDB into a scratch redis-server (as the redis user, like the app's own;
    a Unix socket in a 0700 folder, no TCP port) and count what it holds: a file that
    redis-check-rdb accepts but Redis cannot load, or that loads other keys than it
    holds (those expiring meanwhile aside), raises RedisError. The keys loaded."""
    keys, expiring = _rdb_counts(rdb)
    owner = _owner()
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700, parents=True)
    shutil.copyfile(rdb, scratch / "backup.rdb")
    if owner:
        for path in (scratch, scratch / "backup.rdb"):
            os.chown(path, *owner)
    sock = scratch / "redis.sock"
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", "0",
         "--unixsocket", str(sock), "--unixsocketperm", "700", "--dir", str(scratch),
         "--dbfilename", "backup.rdb", "--appendonly", "no", "--save", "",
         "--logfile", str(scratch / "redis.log"), "--pidfile", str(scratch / "redis.pid")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=scratch,
        start_new_session=True, user=owner[0] if owner else None,
        group=owner[1] if owner else None)
    try:
        loaded = _scratch_keys(sock, proc, timeout)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    if not keys - expiring <= loaded <= keys:
        raise RedisError(f"the RDB holds {keys} keys ({expiring} expiring) but Redis loaded "
                         f"{loaded}")
    return loaded


CHECK_PREFIX = ".check-"
"""Scratch servers' folders in the Redis root (outside apps(): their names start with a
dot), one per RDB being checked."""


def checks(root: Path) -> list[Path]:
    return sorted(root.glob(f"{CHECK_PREFIX}*")) if root.is_dir() else []


def clear_check(folder: Path) -> None:
    """Stop the scratch server of a check whose runner is gone, and remove its folder."""
    pid = _pid(folder)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


def _scratch_keys(sock: Path, proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The keys a scratch server holds once it has loaded its RDB (INFO keyspace)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RedisError(f"redis-server could not load the RDB (exit {proc.returncode})")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(sock))
                s.sendall(b"INFO keyspace\r\n")
                said = b""
                while not said.startswith(b"-") and (
                        b"\r\n" not in said or len(said) < _bulk_length(said)):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    said += chunk
        except OSError:
            time.sleep(0.05)
            continue
        if said.startswith(b"-LOADING"):
            time.sleep(0.05)
            continue
        if not said.startswith(b"$"):
            raise RedisError(f"the scratch Redis answered {said[:120]!r}")
        return sum(int(part.split(b"keys=")[1].split(b",")[0])
                   for part in said.split(b"\r\n") if part.startswith(b"db"))
    raise RedisError(f"the scratch Redis did not load the RDB within {timeout:.0f}s")


def _bulk_length(said: bytes) -> int:
    """The whole length of a RESP bulk string answer whose header has arrived."""
    header, _, _rest = said.partition(b"\r\n")
    return len(header) + 2 + int(header[1:]) + 2


def _install(app_dir: Path, rdb: Path, say: Say) -> None:
    """A new AOF folder whose base is the RDB, in place of the server's (kept beside it
    as `.before`). Everything is done by descriptors relative to the folder, opened
    without following links: the folder is the redis user's."""
    owner = app_dir.stat().st_uid, app_dir.stat().st_gid
    new = f"{AOF_DIR}.restore"
    dir_fd = os.open(app_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        _remove_tree(app_dir, new)
        _remove_tree(app_dir, AOF_DIR + ".before")
        os.mkdir(new, 0o700, dir_fd=dir_fd)
        aof_fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            base = "appendonly.aof.1.base.rdb"
            total, done = rdb.stat().st_size, 0
            with open(rdb, "rb") as src, _created(base, aof_fd, owner) as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    done += len(chunk)
                    say(f"copying: {100 * done // max(total, 1)}% "
                        f"({done / 1e6:,.1f} of {total / 1e6:,.1f} MB)")
                os.fsync(dst.fileno())
            with _created("appendonly.aof.manifest", aof_fd, owner) as f:
                f.write(f"file {base} seq 1 type b\n".encode())
                os.fsync(f.fileno())
            os.fchown(aof_fd, *owner)
        finally:
            os.close(aof_fd)
        with contextlib.suppress(FileNotFoundError):  # a server that never wrote has none
            os.rename(AOF_DIR, AOF_DIR + ".before", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.rename(new, AOF_DIR, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _created(name: str, dir_fd: int, owner: tuple[int, int]) -> Any:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                 dir_fd=dir_fd)
    os.fchown(fd, *owner)
    return os.fdopen(fd, "wb")


def _remove_tree(app_dir: Path, name: str) -> None:
    """Remove `name` in the folder (shutil.rmtree walks by descriptors, follows no link)."""
    dir_fd = os.open(app_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        shutil.rmtree(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def _put_back(root: Path, app: str, launch: Launch | None) -> None:
    """After a restore that did not load: the data the server held before, started."""
    app_dir = folder(root, app)
    marker = _restoring(root, app)
    marker.touch(mode=0o600)
    try:
        if launch is not None:
            launch()
        stop(root, app)
        dir_fd = os.open(app_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            _remove_tree(app_dir, AOF_DIR)
            os.rename(AOF_DIR + ".before", AOF_DIR, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(dir_fd)
    finally:
        marker.unlink(missing_ok=True)
        start(root, app, launch=launch)


def _loaded(app_dir: Path, timeout: float) -> None:
    """Wait until the server has loaded its data: PING as the backup user answers
    -LOADING until then (an unauthenticated one already answers -NOAUTH)."""
    port = int((app_dir / "port").read_text())
    request = (f"AUTH {BACKUP_USER} {_backup_key(app_dir)}\r\nPING\r\n").encode()
    deadline = time.monotonic() + timeout
    said = b""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(request)
                said = b""
                while said.count(b"\r\n") < 2:
                    chunk = s.recv(256)
                    if not chunk:
                        break
                    said += chunk
        except OSError:
            said = b""
        if said.endswith(b"+PONG\r\n"):
            return
        if b"LOADING" not in said and said:
            raise RedisError(f"the restored Redis answers {said[:120]!r}")
        time.sleep(0.1)
    raise RedisError(f"the restored Redis did not finish loading within {timeout:.0f}s")


def apps(root: Path) -> list[str]:
    """The apps that have a Redis here (not one being restored: its supervisor lets it
    go meanwhile)."""
    return sorted(p.parent.name for p in root.glob("*/redis.conf")
                  if not p.parent.name.startswith(".")  # .gone-*: being destroyed
                  and not _restoring(root, p.parent.name).exists())


def start_all(root: Path) -> list[str]:
    for app in apps(root):
        start(root, app)
    return apps(root)


def stop_all(root: Path) -> None:
    for app in apps(root):
        stop(root, app)
