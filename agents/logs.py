"""App logs: shipped by each host agent over ZeroMQ (DEALER) to the collector (ROUTER),
which appends them to chunked files per app, rotated by size; `tally logs` reads the chunks.

Nothing lost, nothing twice. The instance's own log file on the host is the buffer. The
shipper sends what lies past its *acknowledged* offset and moves that offset only when the
collector says it has written the bytes: ZeroMQ having queued them proves nothing (the
collector may be away, the agent killed before they leave). Unacknowledged bytes are sent
again after ACK_TIMEOUT_S, and after an agent restart (the acknowledged offsets are saved).
Every message carries the file's epoch (bumped when the host empties or replaces the file)
and the offset of its first byte; the collector keeps, per instance, the epoch and offset
it has written up to (`shipped.json` in its folder), writes only bytes past it, and answers
with it. So a message sent twice is written once, and a collector that is away delays logs,
never loses them, and never blocks an app. A collector killed between writing a batch and
saving its offsets cuts that batch when it starts again (it saves each app's log size with
the offsets), and the resend writes it once; only a kill right after a rotation can still
repeat the rotated chunk's unsaved tail.

Only the agents write app logs. An instance's stdout and stderr are a pipe; a relay of the
agent's writes the file (agents/logpipe.py): an app can write only its own lines, and
cannot rewrite or remove any. The agent's own lines (R14, why it killed an instance) are
written `tally[<instance>]` where an app's show `<instance>`: no app can forge one.
`tally serve collector` serves CURVE (ledger/curve.py) and admits only the keys
hosts registered through the API and the control plane's (balancers' access logs): a
process with no such key, an app or anyone on the network, can neither add a line to an
app's log nor move an instance's marks to suppress its lines.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import zmq

from agents import logpipe
from ledger import curve as curve_keys

CHUNK_READ = 64 * 1024
WINDOW = 16 * CHUNK_READ
"""Bytes of one file sent and not yet acknowledged, at most."""
ACK_TIMEOUT_S = 5.0
"""Unacknowledged bytes are sent again after this long without an acknowledgement."""
APP = re.compile(r"^[a-z][a-z0-9-]{1,29}$")
INSTANCE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
CURRENT = "current.log"


@dataclass
class Position:
    """Where one instance log stands: its epoch, the bytes the collector acknowledged,
    and the bytes sent (acknowledged or not)."""

    epoch: int = 0
    acked: int = 0
    sent: int = 0
    waiting_since: float = 0.0


class Shipper:
    """Sends the new bytes of every instance log in `logs_dir` to the collector."""

    def __init__(self, endpoint: str, logs_dir: Path, context: zmq.Context | None = None,
                 keep_bytes: int = 8 << 20,
                 clock: Callable[[], float] = time.monotonic,
                 curve: curve_keys.Client | None = None) -> None:
        """`curve`: the collector's public key and this host's registered keypair."""
        self.keep_bytes = keep_bytes
        self.clock = clock
        self.endpoint, self.context, self.curve = endpoint, context, curve
        self.socket = self._connect()
        self.heard = clock()
        """When the collector last acknowledged anything (or the socket was made): bytes
        waiting past ACK_TIMEOUT_S with no word get a new socket (libzmq does not retry a
        refused handshake: a collector that refused this host's key before the host
        registered it would never hear from it again)."""
        self.logs_dir = logs_dir
        self.offsets_file = logs_dir / "offsets.json"
        self.positions: dict[str, Position] = {}
        try:
            saved = json.loads(self.offsets_file.read_text())
        except (OSError, ValueError):
            saved = {}
        for iid, value in saved.items():
            epoch, acked = value if isinstance(value, list) else (0, value)
            self.positions[iid] = Position(epoch, acked, acked)

    def _connect(self) -> zmq.Socket:
        sock = (self.context or zmq.Context.instance()).socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.LINGER, 0)  # unacknowledged bytes are on disk anyway
        if self.curve is not None:
            curve_keys.as_client(sock, self.curve)
        sock.connect(self.endpoint)
        return sock

    @property
    def offsets(self) -> dict[str, int]:
        """The acknowledged offset of each instance log."""
        return {iid: p.acked for iid, p in self.positions.items()}

    def ship(self, running: set[str] | None = None) -> int:
        """One pass: take the collector's acknowledgements, then send what each log has
        past what was sent (or again, what was not acknowledged in time); returns the
        bytes handed to ZeroMQ. A log fully acknowledged is emptied past `keep_bytes`,
        and removed once its instance (not in `running`) is gone."""
        moved = self.take_acks()
        sent, behind = 0, False
        for path in sorted(self.logs_dir.glob("*.log")):
            iid = path.stem
            try:
                sent += self._ship_file(path, iid)
            except zmq.Again:
                behind = True
                break  # the collector is away: try again next pass
            pos = self.positions[iid]
            behind |= pos.sent > pos.acked
            moved |= self._trim(path, iid, running)
        if moved:
            self._save()
        if behind and self.clock() - self.heard > ACK_TIMEOUT_S:
            self.socket.close()
            self.socket, self.heard = self._connect(), self.clock()
        return sent

    def take_acks(self) -> bool:
        """Apply every acknowledgement waiting on the socket; whether an offset moved."""
        moved = False
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return moved
            if len(frames) != 3:
                continue
            self.heard = self.clock()
            iid = frames[0].decode("utf-8", "replace")
            pos = self.positions.get(iid)
            try:
                epoch, end = int(frames[1]), int(frames[2])
            except ValueError:
                continue
            if pos is not None and epoch == pos.epoch and end > pos.acked:
                pos.acked = end
                pos.sent = max(pos.sent, end)
                pos.waiting_since = self.clock()
                moved = True

    def _save(self) -> None:
        tmp = self.offsets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({iid: [p.epoch, p.acked]
                                   for iid, p in self.positions.items()}))
        tmp.replace(self.offsets_file)

    def _trim(self, path: Path, iid: str, running: set[str] | None) -> bool:
        pos = self.positions.get(iid)
        size = path.stat().st_size
        if pos is None or pos.acked < size:
            return False
        if running is not None and iid not in running:
            path.unlink(missing_ok=True)
            del self.positions[iid]
            return True
        if size > self.keep_bytes:
            os.truncate(path, 0)  # writers append (O_APPEND): they go on at the start
            self.positions[iid] = Position(pos.epoch + 1)
            return True
        return False

    def _ship_file(self, path: Path, iid: str) -> int:
        pos = self.positions.setdefault(iid, Position())
        size = path.stat().st_size
        if size < pos.acked:  # emptied or replaced by someone else
            self.positions[iid] = pos = Position(pos.epoch + 1)
            self._save()
        now = self.clock()
        if pos.sent > pos.acked and now - pos.waiting_since > ACK_TIMEOUT_S:
            pos.sent = pos.acked  # no word from the collector: send it all again
        total = 0
        while pos.sent < size and pos.sent - pos.acked < WINDOW:
            with open(path, "rb") as f:
                f.seek(pos.sent)
                data = f.read(CHUNK_READ)
            if len(data) < CHUNK_READ:
                data = data[: data.rfind(b"\n") + 1]  # whole lines only, unless very long
            if not data:
                break
            app = iid.split(".", 1)[0]
            self.socket.send_multipart([app.encode(), iid.encode(), b"%d" % pos.epoch,
                                        b"%d" % pos.sent, data], zmq.NOBLOCK)
            if pos.sent == pos.acked:
                pos.waiting_since = now
            pos.sent += len(data)
            total += len(data)
        return total

    def close(self) -> None:
        self.socket.close()


def names_app(iid: str, app: str) -> bool:
    """Whether an instance's log name belongs to `app`: `<app>.<release>.<type>.<id>`,
    a detached run's `<app>.run.<N>`, or a balancer's access log `router.<app>.<name>`."""
    parts = iid.split(".")
    return parts[0] == app or (len(parts) > 2 and parts[:2] == ["router", app])


def _sender(frame: zmq.Frame) -> str:
    """The CURVE key the frame's connection was admitted with (ZAP's User-Id); empty on
    a collector without CURVE."""
    try:
        return str(frame.get("User-Id"))
    except (zmq.ZMQError, KeyError, UnicodeDecodeError):
        return ""


class Collector:
    """Writes what agents ship into <root>/<app>/current.log, rotated past `max_bytes`
    into chunk-<time>.log files, each byte of an instance's log once. An app keeps its
    newest `keep_chunks` chunks (the oldest go at each rotation): no app's logs fill the
    collector's disk, as Heroku's Logplex keeps an app's last lines only."""

    def __init__(self, root: Path, max_bytes: int = 1 << 20, keep_chunks: int = 100,
                 admits: Callable[[str, str], bool] | None = None) -> None:
        self.root, self.max_bytes, self.keep_chunks = root, max_bytes, keep_chunks
        self.admits = admits
        """(sender, instance) -> whether that host may ship its lines (agents/placed.py)."""
        self.marks_file = root / "shipped.json"
        try:
            saved = json.loads(self.marks_file.read_text())
        except (OSError, ValueError):
            saved = {}
        if "marks" not in saved:  # the first form: the marks alone
            saved = {"marks": saved, "sizes": {}}
        self.marks: dict[str, list[int]] = saved["marks"]
        self.sizes: dict[str, int] = saved["sizes"]
        """Each app's current log size when the marks were last saved. What lies past it was
        written but never acknowledged (the collector killed between its write and its
        save): it is cut at start, and the hosts send it again, so it is written once."""
        self._touched: set[str] = set()
        self._cut_unsaved()

    def _cut_unsaved(self) -> None:
        for app, size in self.sizes.items():
            current = self.root / app / CURRENT
            if APP.match(app) and current.exists() and current.stat().st_size > size:
                os.truncate(current, size)

    def receive(self, app: str, iid: str, epoch: int, offset: int, data: bytes,
                now: datetime | None = None, sender: str = "") -> tuple[int, int]:
        """Write the part of `data` (bytes offset.. of the instance's log in `epoch`) not
        written yet; returns (epoch, offset) written up to, the acknowledgement. Marks are
        kept per `sender` (the shipping host's CURVE key): a host that names another's
        instance with a huge epoch cannot make the collector drop that host's lines, and
        lines go only under the app the instance's name belongs to."""
        if not INSTANCE.match(iid) or not names_app(iid, app):
            return epoch, 0
        if self.admits is not None and not self.admits(sender, iid):
            return epoch, 0  # not placed on that host (or not known yet: sent again)
        key = f"{sender}/{iid}" if sender else iid
        mark_epoch, mark = self.marks.get(key, (epoch, offset))  # new here: from offset
        if epoch < mark_epoch:
            return mark_epoch, mark  # an old epoch, sent again: long written
        if epoch > mark_epoch:
            mark = offset  # the host emptied the file: a new count starts
        if offset > mark:
            return epoch, mark  # a gap (bytes before these not here yet): wait for them
        fresh = data[mark - offset:]
        if fresh:
            self.write(app, iid, fresh, now)
        self.marks[key] = [epoch, max(mark, offset + len(data))]
        return epoch, self.marks[key][1]

    def save(self) -> None:
        """Keep what was written up to, before acknowledging it."""
        self.root.mkdir(parents=True, exist_ok=True)
        for app in self._touched:
            current = self.root / app / CURRENT
            self.sizes[app] = current.stat().st_size if current.exists() else 0
        self._touched.clear()
        tmp = self.marks_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"marks": self.marks, "sizes": self.sizes}))
        tmp.replace(self.marks_file)

    def write(self, app: str, iid: str, data: bytes, now: datetime | None = None) -> None:
        if not APP.match(app):
            return  # not a name we could have placed: never a path
        stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        folder = self.root / app
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = "".join(f"{stamp} tally[{iid}] {line}\n" if ours else f"{stamp} {iid} {line}\n"
                       for ours, line in logpipe.lines(data))
        current = folder / CURRENT
        self._touched.add(app)
        fd = os.open(current, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(fd, "a", encoding="utf-8") as f:
            f.write(text)
        if current.stat().st_size > self.max_bytes:
            current.rename(folder / f"chunk-{time.time_ns():020d}.log")
            for old in sorted(folder.glob("chunk-*.log"))[:-self.keep_chunks or None]:
                old.unlink(missing_ok=True)

    def run(self, endpoint: str, stop: threading.Event,
            context: zmq.Context | None = None,
            curve: tuple[curve_keys.Keypair, curve_keys.Allowed] | None = None) -> None:
        """Until `stop`; with `curve` (its keypair, who may ship), only admitted peers."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)  # every app's logs: the platform's to read, no app's
        context = context or zmq.Context.instance()
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        auth = curve_keys.serve(sock, curve[0], curve[1], context) if curve else None
        sock.bind(endpoint)
        try:
            while not stop.is_set():
                if sock.poll(200):
                    self._batch(sock)
        finally:
            sock.close()
            if auth is not None:
                auth.stop()

    def _batch(self, sock: zmq.Socket) -> None:
        """Everything waiting: write it, save the marks, then acknowledge."""
        acks: dict[tuple[bytes, bytes], tuple[int, int]] = {}
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            if len(frames) != 6:
                continue
            peer, app, iid, epoch, offset, data = (f.bytes for f in frames)
            try:
                at = (int(epoch), int(offset))
            except ValueError:
                continue
            acks[(peer, iid)] = self.receive(app.decode("utf-8", "replace"),
                                             iid.decode("utf-8", "replace"), *at, data,
                                             sender=_sender(frames[1]))
        if acks:
            self.save()
        for (peer, iid), (acked_epoch, end) in acks.items():
            try:
                sock.send_multipart([peer, iid, b"%d" % acked_epoch, b"%d" % end], zmq.NOBLOCK)
            except zmq.ZMQError:
                continue  # that agent went away: it sends again


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
