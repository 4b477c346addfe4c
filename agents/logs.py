"""App logs: shipped by each host agent over ZeroMQ PUSH to the collector (PULL), which
appends them to chunked files per app, rotated by size; `tally logs` reads the chunks.

The instance's own log file on the host is the buffer: the shipper sends what lies past
its offset and moves the offset only once ZeroMQ took the bytes, so a collector that is
down delays logs, it does not lose them, and the app never blocks on logging. Offsets are
saved, so an agent restart does not send a log twice.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import zmq

CHUNK_READ = 64 * 1024
APP = re.compile(r"^[a-z][a-z0-9-]{1,29}$")
CURRENT = "current.log"


class Shipper:
    """Sends the new bytes of every instance log in `logs_dir` to the collector."""

    def __init__(self, endpoint: str, logs_dir: Path, context: zmq.Context | None = None,
                 keep_bytes: int = 8 << 20) -> None:
        self.keep_bytes = keep_bytes
        self.socket = (context or zmq.Context.instance()).socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, 1000)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.connect(endpoint)
        self.logs_dir = logs_dir
        self.offsets_file = logs_dir / "offsets.json"
        try:
            self.offsets: dict[str, int] = json.loads(self.offsets_file.read_text())
        except (OSError, ValueError):
            self.offsets = {}

    def ship(self, running: set[str] | None = None) -> int:
        """One pass over the logs; returns the bytes handed to ZeroMQ. A log fully shipped
        is emptied past `keep_bytes`, and removed once its instance (not in `running`)
        is gone, so a host's disk does not fill up with what the collector already has."""
        sent = 0
        for path in sorted(self.logs_dir.glob("*.log")):
            iid = path.stem
            try:
                sent += self._ship_file(path, iid)
            except zmq.Again:
                break  # the collector is away: try again next pass
            self._trim(path, iid, running)
        if sent:
            tmp = self.offsets_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.offsets))
            tmp.replace(self.offsets_file)
        return sent

    def _trim(self, path: Path, iid: str, running: set[str] | None) -> None:
        size = path.stat().st_size
        if self.offsets.get(iid, 0) < size:
            return
        if running is not None and iid not in running:
            path.unlink(missing_ok=True)
            self.offsets.pop(iid, None)
        elif size > self.keep_bytes:
            os.truncate(path, 0)  # writers append (O_APPEND): they go on at the start
            self.offsets[iid] = 0

    def _ship_file(self, path: Path, iid: str) -> int:
        offset = self.offsets.get(iid, 0)
        if path.stat().st_size < offset:
            offset = 0  # truncated or replaced
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(CHUNK_READ)
        if len(data) < CHUNK_READ:
            data = data[: data.rfind(b"\n") + 1]  # whole lines only, unless very long
        if not data:
            return 0
        app = iid.split(".", 1)[0]
        self.socket.send_multipart([app.encode(), iid.encode(), data], zmq.NOBLOCK)
        self.offsets[iid] = offset + len(data)
        return len(data)

    def close(self) -> None:
        self.socket.close()


class Collector:
    """Writes what agents ship into <root>/<app>/current.log, rotated past `max_bytes`
    into chunk-<time>.log files."""

    def __init__(self, root: Path, max_bytes: int = 1 << 20) -> None:
        self.root, self.max_bytes = root, max_bytes

    def write(self, app: str, iid: str, data: bytes, now: datetime | None = None) -> None:
        if not APP.match(app):
            return  # not a name we could have placed: never a path
        stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        folder = self.root / app
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        lines = data.decode("utf-8", "replace").splitlines()
        text = "".join(f"{stamp} {iid} {line}\n" for line in lines)
        current = folder / CURRENT
        fd = os.open(current, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(fd, "a", encoding="utf-8") as f:
            f.write(text)
        if current.stat().st_size > self.max_bytes:
            current.rename(folder / f"chunk-{time.time_ns():020d}.log")

    def run(self, endpoint: str, stop: threading.Event,
            context: zmq.Context | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)  # every app's logs: the platform's to read, no app's
        sock = (context or zmq.Context.instance()).socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        try:
            while not stop.is_set():
                if not sock.poll(200):
                    continue
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if len(frames) == 3:
                        self.write(frames[0].decode("utf-8", "replace"),
                                   frames[1].decode("utf-8", "replace"), frames[2])
        finally:
            sock.close()


def chunks(root: Path, app: str) -> list[Path]:
    """The app's log files, oldest first."""
    if not APP.match(app):
        raise ValueError(f"{app!r} is not an app name")
    folder = root / app
    return sorted(folder.glob("chunk-*.log")) + ([folder / CURRENT]
                                                  if (folder / CURRENT).exists() else [])


def tail(root: Path, app: str, lines: int) -> list[str]:
    """The app's last `lines` log lines, across chunks."""
    out: list[str] = []
    for path in reversed(chunks(root, app)):
        out = path.read_text(encoding="utf-8", errors="replace").splitlines() + out
        if len(out) >= lines:
            break
    return out[-lines:] if lines else []


def follow(root: Path, app: str, stop: threading.Event, interval: float = 0.2,
           idle: bool = False) -> Iterator[str]:
    """Lines appended to the app's log from now on, across rotations; with `idle`, also
    an empty string after each wait that found nothing (a streaming reader's chance to
    send a keep-alive or notice its client left)."""
    current = root / app / CURRENT
    offset = current.stat().st_size if current.exists() else 0
    inode = current.stat().st_ino if current.exists() else None
    while not stop.is_set():
        if current.exists():
            st = current.stat()
            if st.st_ino != inode:  # rotated: the new file starts from its beginning
                inode, offset = st.st_ino, 0
            if st.st_size > offset:
                with open(current, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                end = data.rfind(b"\n") + 1
                offset += end
                yield from data[:end].decode("utf-8", "replace").splitlines()
                continue
        stop.wait(interval)
        if idle:
            yield ""
