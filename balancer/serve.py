"""`tally serve balancer`: the entry point, the only place eventlet runs.

One process per `--processes`, each with its own listening socket on the same port
(SO_REUSEPORT: the kernel spreads connections, so the processes use every core). With more
than one, a parent forks them (before any eventlet hub or thread exists), restarts one that
dies, and passes SIGTERM on.

In each process: the routes come from the routes view through the API, with the balancer's
own token (woken over ZeroMQ by the relays, then asking the API for the table once the
routes projector has applied the position the relay announced, so a change is seen as soon
as it is projected; and reconciled on a timer), or from a JSON file in standalone mode.
On the platform the same token also fetches slugs for their static files and sends router
samples every `stats_every` seconds (`tally stats`). SIGTERM drains: stop accepting, close
idle kept-alive connections, let requests in flight finish (up to `drain` seconds), exit.

eventlet is not monkey-patched: the shell uses non-blocking sockets with the hub directly,
`eventlet.green.zmq` for the relays, and `eventlet.tpool` threads for the API requests, so
nothing else in the process changes behaviour.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from balancer.accesslog import SOURCE, AccessLog, Stream
from balancer.h1 import Limits
from balancer.routing import Router, Settings
from balancer.sources import ApiRoutes, FileRoutes, RoutesAway, RoutesError
from balancer.static import StaticStore
from balancer.tls import Certificates, RouteCertificates

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # eventlet's "deprecated, bugfix mode" notice
    import eventlet
    import eventlet.hubs
    import eventlet.queue
    from eventlet import tpool
    from eventlet.green import zmq as gzmq


from balancer.admin import serve_admin  # noqa: E402  (imports eventlet too)
from balancer.hub import Hub as OneShotHub  # noqa: E402
from balancer.metrics import Metrics  # noqa: E402
from balancer.shell import Proxy, Timeouts, accept_forever  # noqa: E402
from ledger import curve as curve_keys  # noqa: E402
from ledger.relay import TOPIC  # noqa: E402


@dataclass(frozen=True)
class Options:
    bind: tuple[str, int]
    routes_file: str | None = None
    api: str | None = None
    """The API's URL (`tally serve api`), which gives the routes to this balancer's token."""
    token: str = ""
    balancer_id: str = ""
    relays: Sequence[str] = ()
    processes: int = 1
    settings: Settings = field(default_factory=Settings)
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    drain: float = 30.0
    reconcile: float = 1.0
    """Seconds between reads of the routes when no wake-up comes."""
    admin: tuple[str, int] | None = None
    collector: str | None = None
    cache: str | None = None
    """Platform mode: the last routes read, kept here for a start while the API is away."""
    tls_bind: tuple[str, int] | None = None
    """Where to terminate TLS: with the routes' certificates (their keys opened with
    `seal_key`), else those of `certs`."""
    certs: str | None = None
    seal_key: str | None = field(default=None, repr=False)
    static_dir: str | None = None
    """Platform mode: where slugs' static files are unpacked (one folder per process)."""
    stats_every: float = 10.0
    """Platform mode: seconds between router samples sent to the API (`tally stats`)."""
    """Where the access log goes (the log collector's PULL endpoint); None: no log."""
    collector_curve: curve_keys.Client | None = None
    """The collector's CURVE key and this balancer's keypair (the control plane's)."""


def log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} balancer[{os.getpid()}] {line}", file=sys.stderr,
          flush=True)


def listen(bind: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(bind)
    sock.listen(1024)
    return sock


def main(options: Options) -> int:
    if options.processes <= 1:
        return run(options)
    return supervise(options)


def supervise(options: Options) -> int:
    """Fork `processes` workers; restart one that dies until SIGTERM, then pass it on."""
    stopping = False
    children: dict[int, int] = {}

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run(options, admin=options.admin if slot == 0 else None, slot=slot)
            finally:
                os._exit(code)
        children[pid] = slot

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    for slot in range(options.processes):
        spawn(slot)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        ended = children.pop(pid, None)
        if ended is not None and not stopping:
            log(f"worker {pid} ended ({status}); starting another")
            time.sleep(0.2)
            spawn(ended)
    return 0


def run(options: Options, admin: tuple[str, int] | None = None, slot: int = 0) -> int:
    """One balancer process, until SIGTERM has drained it."""
    eventlet.hubs.use_hub(OneShotHub)
    admin = options.admin if admin is None and options.processes <= 1 else admin
    access = AccessLog() if options.collector else None
    proxy = Proxy(Router(options.settings), options.limits, options.timeouts,
                  metrics=Metrics(), access=access, log=log)
    if access is not None and options.collector:
        eventlet.spawn_n(ship_access_log, access, options.collector,
                         f"{options.bind[1]}.{slot}", options.collector_curve)
    listener = listen(options.bind)
    tls_listener = None
    if options.tls_bind:
        tls_listener = listen(options.tls_bind)
        proxy.https_port = options.tls_bind[1]
        folder = Certificates(options.certs) if options.certs else None
        proxy.certificates = RouteCertificates(proxy.router, opener(options.seal_key), folder)
        eventlet.spawn_n(accept_forever, proxy, tls_listener, proxy.certificates.context)
        if folder is not None:
            eventlet.spawn_n(follow_certs, folder, options.reconcile)
    if options.routes_file:
        source = FileRoutes(options.routes_file)
        load_file(proxy, source)
        eventlet.spawn_n(follow_file, proxy, source, options.reconcile)
    else:
        api = ApiRoutes(options.api or "", options.token, options.balancer_id,
                        cache=options.cache)
        if options.static_dir:
            proxy.static = StaticStore(Path(options.static_dir) / str(slot), api.fetch_slug)
        cached = api.cached()
        if cached is not None:
            proxy.update_routes(*cached)
        load_api(proxy, api, target=0)
        eventlet.spawn_n(follow_api, proxy, api, options.relays, options.reconcile)
        eventlet.spawn_n(ship_stats, proxy, api, options.stats_every)
    eventlet.spawn_n(sweep_forever, proxy)
    if admin:
        eventlet.spawn_n(serve_admin, proxy, listen(admin))

    def drain(signum: int, _frame: object) -> None:
        proxy.draining = True
        for sock in (listener, tls_listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the accept loop

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    # Everything imported so far lives as long as the process: out of the collector's
    # sight, a full collection walks only what requests made (else ~100k objects, whose
    # walk would stall every request in flight for tens of milliseconds).
    gc.collect()
    gc.freeze()
    log(f"listening on {options.bind[0]}:{options.bind[1]}, routes version "
        f"{proxy.router.version}")
    accept_forever(proxy, listener)
    listener.close()
    if tls_listener is not None:
        tls_listener.close()
    deadline = time.monotonic() + options.drain
    while proxy.watches and time.monotonic() < deadline:
        eventlet.sleep(0.05)
    log(f"drained ({len(proxy.watches)} connections left)")
    return 0


def opener(seal_key: str | None) -> Callable[[str], str]:
    """How this process opens the routes' sealed keys (with no seal key it cannot: the
    certificates are said not loaded, and the fallback folder's serve)."""
    from ledger.tls import CertificateRefused, unseal

    def open_key(sealed: str) -> str:
        if seal_key is None:
            raise CertificateRefused("no seal key (TALLY_SEAL_KEY) to open it with")
        return unseal(seal_key, sealed)
    return open_key


def follow_certs(certs: Certificates, interval: float) -> None:
    while True:
        eventlet.sleep(interval)
        if certs.reload():
            log(f"certificates: {', '.join(certs.names)}"
                + (f"; not loaded: {'; '.join(certs.errors)}" if certs.errors else ""))


def sweep_forever(proxy: Proxy) -> None:
    while True:
        eventlet.sleep(0.1)
        proxy.sweep()
        proxy.pool.prune(time.monotonic())


def load_file(proxy: Proxy, source: FileRoutes) -> None:
    try:
        routes = source.changed()
    except RoutesError as exc:
        log(f"routes not changed: {exc}")
        return
    if routes is not None:
        proxy.update_routes(routes, source.version)
        log(f"routes version {source.version}: {len(routes)} hostnames")


def follow_file(proxy: Proxy, source: FileRoutes, interval: float) -> None:
    while True:
        eventlet.sleep(min(interval, 0.5))
        load_file(proxy, source)


def load_api(proxy: Proxy, api: ApiRoutes, target: int) -> None:
    """Ask the API for the routes once the routes projector has applied `target`; apply
    them if their version moved."""
    try:
        got = tpool.execute(api.fetch, max(proxy.router.version, 0), target)
    except RoutesAway as exc:  # keep the routes we have
        log(f"routes not read: {exc}")
        return
    if got is not None:
        routes, version, doc = got
        proxy.update_routes(routes, version)
        log(f"routes version {version}: {len(routes)} hostnames")
        tpool.execute(api.keep, doc)  # the cache, written once the routes are in force


def follow_api(proxy: Proxy, api: ApiRoutes, relays: Sequence[str], interval: float) -> None:
    wakeups: eventlet.queue.LightQueue = eventlet.queue.LightQueue()
    if relays:
        eventlet.spawn_n(listen_relays, relays, wakeups)
    while True:
        try:
            target = wakeups.get(timeout=interval)
        except eventlet.queue.Empty:
            target = 0
        while not wakeups.empty():
            target = max(target, wakeups.get_nowait())
        load_api(proxy, api, target)


def ship_stats(proxy: Proxy, api: ApiRoutes, every: float) -> None:
    """Every `every` seconds, the router samples since the last ones stored, to the API (a
    failed send leaves them in the next samples)."""
    while True:
        eventlet.sleep(every)
        samples, mark = proxy.metrics.samples()
        if not samples:
            continue
        try:
            tpool.execute(api.post_stats, samples)
        except RoutesAway as exc:
            log(f"router samples not sent: {exc}")
            continue
        proxy.metrics.sent(mark)


def listen_relays(relays: Sequence[str], wakeups: eventlet.queue.LightQueue) -> None:
    """Each relay's "ledger moved to P" becomes a wake-up (P), de-duplicated by head. The
    relays speak CURVE when this process was given a keypair (ledger/curve.py); without one
    a CURVE relay sends nothing, and the timer alone reconciles."""
    from ledger import curve

    context = gzmq.Context()
    sub = context.socket(gzmq.SUB)
    client = curve.default()
    if client is not None:
        curve.as_client(sub, client)
    sub.setsockopt(gzmq.LINGER, 0)
    sub.setsockopt(gzmq.SUBSCRIBE, TOPIC)
    sub.setsockopt(gzmq.RECONNECT_IVL, 100)
    sub.setsockopt(gzmq.RECONNECT_IVL_MAX, 2000)
    for endpoint in relays:
        sub.connect(endpoint)
    head = 0
    while True:
        _, position = sub.recv_multipart()
        try:
            p = int(position)
        except ValueError:
            continue
        if p > head:
            head = p
            wakeups.put(p)


def ship_access_log(access: AccessLog, endpoint: str, name: str,
                    curve: curve_keys.Client | None = None, every: float = 0.5,
                    resend_after: float = 5.0, max_pending: int = 1 << 20) -> None:
    """Every half second, each app's new access log lines to the collector, as the host
    agents ship app logs (acknowledged byte streams; unacknowledged bytes go again after
    `resend_after` seconds). `name` tells this process's streams apart (port and slot).
    `curve`: the collector's key and this balancer's admitted keypair."""
    sock = gzmq.Context().socket(gzmq.DEALER)
    sock.setsockopt(gzmq.SNDHWM, 1000)
    sock.setsockopt(gzmq.LINGER, 0)
    if curve is not None:
        curve_keys.as_client(sock, curve)
    sock.connect(endpoint)
    streams: dict[str, Stream] = {}
    by_iid: dict[bytes, Stream] = {}
    while True:
        eventlet.sleep(every)
        now = time.monotonic()
        while True:  # acknowledgements: [iid, epoch, end]
            try:
                iid, epoch, end = sock.recv_multipart(gzmq.NOBLOCK)
            except (gzmq.Again, ValueError):
                break
            stream = by_iid.get(iid)
            if stream is not None:
                stream.ack(int(epoch), int(end), now)
        for app, data in access.take().items():
            stream = streams.get(app)
            if stream is None:
                stream = streams[app] = Stream(f"{SOURCE}.{app}.{name}", time.time_ns(), now)
                by_iid[stream.iid.encode()] = stream
            stream.add(data, max_pending, time.time_ns())
            send(sock, app, stream, stream.offset_of_last(data), data)
        for app, stream in streams.items():
            if stream.pending and now - stream.acked_at > resend_after:
                send(sock, app, stream, stream.base, stream.pending)
                stream.acked_at = now


def send(sock: object, app: str, stream: Stream, offset: int, data: bytes) -> None:
    with contextlib.suppress(gzmq.Again):  # the collector is away: sent again later
        sock.send_multipart([app.encode(), stream.iid.encode(), b"%d" % stream.epoch,  # type: ignore[attr-defined]
                             b"%d" % offset, data], gzmq.NOBLOCK)
