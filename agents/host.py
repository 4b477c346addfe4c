"""The host agent (`tally serve agent --host-id H --api URL`): run on this host what the
placer put here, report what happens to it, and say the host is alive.

It holds no ledger credentials: it speaks only to the API, with its host's agent token
(agents/api_client.py), as a kubelet speaks only to the API server. Each round (a relay
wake-up or the timer): heartbeat when due (the reply says whether the host's desired state
moved), read the desired state through the API when it moved, notice exits, finish
preparations, then apply the plan of the pure core (agents/supervision.py). What it
observes goes through an outbox on disk (agents/outbox.py): while the API is away the
apps keep running, reports wait in order, and go when it returns. The last desired state
is kept on disk too, so an agent restarted while the API is away keeps its apps.

Preparing a release (fetch its slug, check its digest, unpack it once per host) runs on a
worker thread so heartbeats never wait for a download. Agents never build: a release is
placed only once a builder made its slug (agents/builder.py), and an instance runs it at
/app in an overlay of its own (agents/runtime.py). One instance's failure is reported as
that instance's exit and never stops the others. On restart the agent adopts the processes
its pid records name, so nothing is orphaned or started twice; it leaves its processes
running when it stops, and the next agent adopts them.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import queue
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from agents import (
    binds,
    bundle,
    cgroups,
    cleanup,
    health,
    netrules,
    ports,
    runtime,
    slug,
    users,
)
from agents.api_client import ApiAway, ApiError, HostApi
from agents.desired import fleet_of
from agents.fleet import App, Fleet
from agents.logs import Shipper
from agents.outbox import Outbox
from agents.processes import Limits, Processes
from agents.runs import RunServer
from agents.stats import (
    ANY_APP,
    Sample,
    Sender,
    StatsListener,
    Traffic,
    holding,
    socket_inodes,
    usage,
)
from agents.supervision import (
    ALIVE,
    FAILED_CHECKS,
    Action,
    Do,
    Local,
    State,
    Want,
    after_check,
    after_exit,
    plan,
)
from ledger import curve
from ledger.relay import host_wakes
from ledger.sizes import DEFAULT_SIZE, size_of
from ledger.subscriber import Subscriber
from ledger.tickets import Ticket
from ledger.vocabulary import RELEASE_PHASE

log = logging.getLogger("tally.agent")
INSTANCE_TAIL = 20
"""Last lines of an exited instance's output reported (what `ps` and `why` quote)."""
PHASE_TAIL = 100
"""Last lines of a release phase reported: `tally deploy` prints them when it fails."""


@dataclass(frozen=True)
class HostSpec:
    host_id: str
    address: str
    port_min: int
    port_max: int
    capacity: int
    addon_ports: frozenset[int] = frozenset()
    """The platform's add-on services' ports on this host (the apps' PostgreSQL cluster, the
    Redis range): an app may reach those of its own add-ons (netrules.addon_ports)."""
    backend_clients: tuple[str, ...] = ()
    """Addresses besides this host that may connect to the instances' ports (the balancers
    on other hosts); everyone else is refused (netrules.Backends)."""
    user_prefix: str = users.DEFAULT_PREFIX
    """The platform's prefix of its apps' Unix user names (agents/users.py)."""


@dataclass(frozen=True)
class Paths:
    state: Path
    """This agent's own folder: pid records, instance logs, app homes."""
    bundles: Path
    releases: Path
    api: str = ""
    """The API to download bundles from with `api_token`; empty: read `bundles` directly."""
    api_token: str = field(default="", repr=False)

    @property
    def downloads(self) -> Path:
        """Slugs downloaded from the API (agents/bundle.py), one per digest."""
        return self.state / "bundles"

    @property
    def layers(self) -> Path:
        """Each instance's own writes, above its slug (agents/runtime.py)."""
        return self.state / "instances"


@dataclass(frozen=True)
class Timing:
    heartbeat: float = 2.0
    grace: float = 10.0
    """Seconds between SIGTERM and SIGKILL."""
    health_timeout: float = 1.0
    boot_timeout: float = 60.0
    """Seconds a web instance has to bind its port before it is killed (Heroku's R10)."""
    health_every: float = 5.0
    """Seconds between health checks of a healthy web instance."""
    stats_every: float = 10.0
    """Seconds between stats samples (agents/stats.py)."""
    cleanup_every: float = 60.0
    """Seconds between removals of unused releases and deleted apps (agents/cleanup.py)."""
    desired_every: float = 10.0
    """Seconds between reads of the desired state when nothing said it moved (backstop)."""
    desired_min: float = 0.2
    """At most one read of the desired state per this many seconds on relay wake-ups (they
    come for this host's topics only, ledger/relay.py, but an app's rollout may come in a
    burst)."""


class Agent:
    def __init__(self, api: HostApi, spec: HostSpec, paths: Paths,
                 timing: Timing | None = None, limits: Limits | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 collector: str | None = None,
                 collector_key: bytes | None = None) -> None:
        self.api, self.spec, self.paths = api, spec, paths
        self.timing = timing or Timing()
        self.limits = limits or Limits()
        self.clock = clock
        self.fleet = Fleet()
        self.local: dict[str, Local] = {}
        self.procs = Processes(paths.state)
        self.curve = curve.load_or_create(paths.state / "curve.key")
        """This host's CURVE keypair: its public key is registered, the relays and the
        collector admit it."""
        self.shipper = Shipper(collector, self.procs.logs, curve=curve.Client(
            collector_key, self.curve) if collector_key else None) if collector else None
        self.runs: RunServer | None = None
        self.ended_runs: queue.Queue[tuple[str, int, dict[str, Any]]] = queue.Queue()
        runtime.prepare_mountpoint()
        for private in (paths.state, paths.releases, paths.state / "homes", paths.layers):
            private.mkdir(parents=True, exist_ok=True)
            private.chmod(0o711)  # apps may pass through to their own folder, not list
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare")
        self.checker = ThreadPoolExecutor(max_workers=8, thread_name_prefix="health")
        """A round's health checks run side by side: one app's slow answers hold the
        loop (and the heartbeat) for one check's timeout at most, not one per instance."""
        self.checks: dict[str, Future] = {}
        self.remover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="remove")
        """What deleted apps left, removed off the loop: removing a user walks the host's
        /tmp, /var/tmp and /dev/shm for its files, minutes on a host with a big /tmp, and
        in the loop no heartbeat went meanwhile (the placer took the host for lost and
        moved all its instances away)."""
        self.removing: dict[str, Future] = {}
        """App -> its removal under way (`remove_app`)."""
        self.preparing: dict[str, Future] = {}
        self.next_beat = 0.0
        self.uids: dict[str, int] = {}
        """App -> uid of its user on this machine (netrules.app_uids), each round."""
        self.statsd_sockets: dict[int, str] = {}
        """Socket inode -> the instance holding it (statsd senders already found)."""
        self.statsd = StatsListener(paths.state / "statsd.port", self.statsd_sender)
        self.traffic = Traffic()
        self.disk = runtime.DiskWatch()
        self.next_stats = 0.0
        self.next_cleanup = 0.0
        self.cgroups = cgroups.for_agent(spec.host_id, paths.state)
        root = cgroups.root_name(spec.host_id, paths.state)
        self.netrules = netrules.for_agent(root)
        self.binds = binds.for_agent(root, spec.port_min, spec.port_max)
        """Only the app placed on a port of the range may bind it (agents/binds.py)."""
        self.netrules_lock = threading.Lock()
        self.reach: list[netrules.Reach] = []
        self.owners: dict[int, int] = {}
        """Port -> uid of the app placed there: only it may answer from that port."""
        self.ports = ports.Holder(spec.address, spec.port_min, spec.port_max)
        self.outbox = Outbox(paths.state / "outbox.jsonl")
        self.registered = False
        self.desired_version = -1
        """Version of the desired state in self.fleet (-1: none known, do not act yet)."""
        self.desired_due = 0.0
        self.desired_read = -1e9
        self._load_desired()

    # --- the loop -------------------------------------------------------------------------

    def start(self) -> None:
        """Register the host, read its desired state, adopt what our pid records name. The
        API may be away: the apps we adopt keep running, and we register when it is back."""
        s = self.spec
        self.runs = RunServer(s.address, self.prepare_run, self.limits, None,
                              s.host_id, self.procs.logs, self.run_ended, own=self.curve)
        self.runs.start()
        self.register()
        self.read_desired(force=True)
        self.adopt(self.wants())

    def register(self) -> None:
        """Register the host through the API; its answer holds this host's key of run
        tickets, kept in memory only, and the API's CURVE key, the one client the run
        socket admits (no one-off runs until then, or when the API has no key)."""
        s = self.spec
        try:
            answer = self.api.register({"address": s.address, "port_min": s.port_min,
                               "port_max": s.port_max, "capacity": s.capacity,
                               "memory_mb": psutil.virtual_memory().total // 2**20,
                               "run_endpoint": self.runs.endpoint if self.runs else "",
                               "public_key": self.curve.public.decode()})
            if self.runs is not None:
                key, api = answer.get("run_key"), answer.get("run_channel_key")
                self.runs.admit(bytes.fromhex(key) if key else None,
                                api.encode() if key and api else None)
            self.registered = True
        except ApiAway as exc:
            log.warning("cannot register yet: %s", exc)

    def run(self, stop: threading.Event, relays: tuple[str, ...] | list[str] = (),
            interval: float = 0.25, stop_apps: bool = False, relay_key: str = "") -> None:
        """Until `stop`; woken by the relays (over CURVE with this host's keypair when
        `relay_key`, their public key, is known), polling anyway."""
        keys = curve.Client(relay_key.encode(), self.curve) if relay_key else None
        sub = Subscriber(relays, curve=keys, topics=self.wake_topics()) if relays else None
        try:
            self.start()
            woken = False
            while not stop.is_set():
                try:
                    self.tick(woken)
                except Exception:  # a bug in one round must not stop the host's apps
                    log.exception("agent round failed")
                if sub is not None:
                    sub.follow(self.wake_topics())
                woken = (sub.wait(interval) is not None) if sub else stop.wait(interval)
        finally:
            if sub is not None:
                sub.close()
            if self.runs is not None:
                self.runs.close()
            if self.shipper is not None:
                self.shipper.ship()
                self.shipper.close()
            self.statsd.close()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.checker.shutdown(wait=False, cancel_futures=True)
            self.remover.shutdown(wait=False, cancel_futures=True)
            if stop_apps:
                self.stop_all(min(self.timing.grace, 5.0))
                if self.cgroups is not None:
                    self.cgroups.close()
            if self.netrules is not None:  # adopted apps go unconfined until the next agent
                self.netrules.remove()
            if self.binds is not None:
                self.binds.close()

    def wake_topics(self) -> set[bytes]:
        """What the relays wake this host for: its own placements and runs, and the
        rollouts and unplacements of the apps placed on it; not every move of the ledger."""
        return host_wakes(self.spec.host_id, (p.app for p in self.fleet.placements.values()))

    def stop_all(self, grace: float) -> None:
        """SIGTERM every instance, SIGKILL what is left after `grace` seconds."""
        alive = {iid: loc.pid for iid, loc in self.local.items()
                 if loc.state in ALIVE and loc.pid is not None}
        for pid in alive.values():
            self.procs.signal_group(pid, 15)
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            alive = {i: p for i, p in alive.items() if not self.procs.exit_status(p)[0]}
            time.sleep(0.05)
        for pid in alive.values():
            self.procs.signal_group(pid, 9)
        for iid, loc in list(self.local.items()):
            self.procs.forget(iid)
            if loc.state in ALIVE:
                self.report(iid, "InstanceStopped", reason="host agent stopped")

    def tick(self, woken: bool = False) -> None:
        now = self.clock()
        if not self.registered:
            self.register()
        self.ports.hold_free()  # no app may squat a port of our range
        if now >= self.next_beat:
            self.next_beat = now + self.timing.heartbeat
            self.heartbeat()
        if woken and now - self.desired_read >= self.timing.desired_min:
            self.desired_due = now
        if now >= self.desired_due:
            self.read_desired()
        if self.outbox:
            self.outbox.flush(self.send)
        self.uids = (netrules.app_uids(self.fleet.apps, self.spec.user_prefix)
                     if os.geteuid() == 0 else {})
        wants = self.wants()
        self.observe(wants, now)
        self.record_run_ends()
        if self.desired_version < 0:
            return  # never told what to run: keep what runs, start and stop nothing
        actions = plan(wants, self.local, now)
        self.checks = {a.instance_id: self.checker.submit(self.health, a.want)
                       for a in actions if a.kind is Do.CHECK}
        for action in actions:
            try:
                self.apply(action, now)
            except Exception:  # one instance's trouble must not stop the others
                log.exception("%s %s failed", action.kind, action.instance_id)
        self.confine_network()
        if self.shipper is not None:
            detached = self.runs.detached_ids() if self.runs else set()
            self.shipper.ship(running=set(self.local) | detached)
        if now >= self.next_stats:
            self.next_stats = now + self.timing.stats_every
            self.record_stats()
        if now >= self.next_cleanup:
            self.next_cleanup = now + self.timing.cleanup_every
            self.clean(wants)

    def confine_network(self, also: Want | None = None,
                        user: users.AppUser | None = None) -> None:
        """Apply the apps' reach rules (agents/netrules.py) if they changed: each round,
        and before an app process starts (`also`: an instance or a run, as `user`)."""
        if self.netrules is None and self.binds is None:
            return
        with self.netrules_lock:
            if also is None:  # the loop's thread: the only one reading the fleet
                uids = self.uids
                self.reach = netrules.reach_of(self.instances_here(), {
                    name: app.addons for name, app in self.fleet.apps.items()
                }, uids, self.spec.address, self.spec.addon_ports)
                self.owners = {port: uids[app] for app, port in self.instances_here()
                               if port and app in uids}
            app = self.fleet.apps.get(also.app) if also is not None else None
            extra = ([netrules.Reach(user.uid, frozenset(
                {also.port, *netrules.addon_ports(app.addons if app else (), self.spec.address,
                                                  self.spec.addon_ports)}))]
                     if also is not None and user is not None else [])
            owners = ({**self.owners, also.port: user.uid}
                      if also is not None and user is not None and also.port else self.owners)
            if self.binds is not None:  # before the port is let go for the app to bind
                try:
                    self.binds.apply(owners, self.ports.held)
                except OSError as exc:
                    log.warning("ports are no longer reserved by uid: %s", exc)
                    self.binds.close()
                    self.binds = None
            if self.netrules is None:
                return
            s = self.spec
            self.netrules.apply([*self.reach, *extra], [self.statsd.port], netrules.Backends(
                s.address, s.port_min, s.port_max, owners, s.backend_clients))

    def statsd_sender(self, sender: Sender) -> str | None:
        """The instance holding the socket a statsd datagram came from (statsd's thread):
        it may count for itself only. An agent that is not root runs every app as itself:
        any."""
        if os.geteuid() != 0:
            return ANY_APP
        app = self.app_of_uid(sender.uid)
        if app is None:
            return None
        cached = self.statsd_sockets.get(sender.inode, "")
        if cached.startswith(f"{app}."):
            return cached
        leaders = {iid: loc.pid for iid, loc in list(self.local.items())
                   if loc.pid and iid.startswith(f"{app}.")}
        found = holding(sender.inode, leaders, socket_inodes)
        if found is None:  # not adopted yet (a new agent registers first): its pid records
            found = holding(sender.inode, {r.instance_id: r.pid for r in self.procs.records()
                                           if r.instance_id.startswith(f"{app}.")},
                            socket_inodes)
        if found is not None:
            if len(self.statsd_sockets) > 4096:
                self.statsd_sockets.clear()
            self.statsd_sockets[sender.inode] = found
        return found

    def app_of_uid(self, uid: int) -> str | None:
        """The app whose user `uid` is: from the loop's last round, or (before its first,
        adopted instances already reporting) from the system's users."""
        known = next((app for app, u in self.uids.items() if u == uid), None)
        if known is not None:
            return known
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            return None
        prefix = self.spec.user_prefix
        return next((app for app in list(self.fleet.apps)
                     if users.user_name(app, prefix) == name), None)

    def instances_here(self) -> list[tuple[str, int]]:
        """(app, port) of the instances placed on this host, or still running here."""
        return [*((p.app, p.port) for p in self.fleet.placements.values()
                  if p.host_id in ("", self.spec.host_id)),
                *((loc.want.app, loc.want.port) for loc in self.local.values() if loc.want)]

    def record_stats(self) -> None:
        """One stats row per running instance; a failed write skips that sample only."""
        self.traffic.served.update(self.statsd.take())
        self.traffic.keep_only(set(self.local))
        self.disk.keep_only(set(self.local))
        samples = []
        for iid, loc in self.local.items():
            if loc.state not in ALIVE or loc.pid is None or loc.want is None:
                continue
            memory, cpu = usage(loc.pid)
            if line := cgroups.watch(self.cgroups, iid, loc.want.size,
                                     partial(self.procs.runs, loc.pid)):
                self.procs.say(iid, line)
            if line := self.disk.check(iid, loc.pid, loc.want.size):
                self.procs.say(iid, line)
            samples.append(Sample(loc.want.app, iid, self.spec.host_id,
                                  self.traffic.report(iid), loc.restarts, memory, cpu))
        try:
            self.api.stats([{"app": s.app, "instance_id": s.instance_id,
                             "requests": s.requests, "restarts": s.restarts,
                             "memory_bytes": s.memory_bytes, "cpu_seconds": s.cpu_seconds}
                            for s in samples])
        except ApiError as exc:
            log.warning("stats sample not written: %s", exc)

    def clean(self, wants: dict[str, Want]) -> None:
        """Remove unused releases and what deleted apps left here (agents/cleanup.py). Not
        while an adopted instance's app is unknown: it may be one of those."""
        if any(loc.want is None for loc in self.local.values()):
            return
        on_disk: dict[str, set[str]] = {}
        for folder in (self.paths.releases, self.paths.state / "homes"):
            for entry in folder.iterdir() if folder.exists() else ():
                if entry.name.startswith(GONE):
                    remove_tree(entry)  # a removal a killed agent left half done
                elif not entry.name.startswith("."):
                    on_disk.setdefault(entry.name, set())
        for app, digests in on_disk.items():
            folder = self.paths.releases / app
            for d in folder.iterdir() if folder.is_dir() else ():
                if d.name.startswith(GONE) or (d.name.startswith(bundle.UNPACKING) and
                                               time.time() - d.stat().st_mtime > 3600):
                    remove_tree(d)  # half done by a killed agent (an unpack takes seconds)
                elif not d.name.startswith("."):  # not an unpacking in progress
                    digests.add(d.name)
        self.clean_layers()
        in_use: dict[str, set[str]] = {}
        for want in [*wants.values(), *(loc.want for loc in self.local.values() if loc.want)]:
            in_use.setdefault(want.app, set()).add(want.digest)
        if self.cgroups is not None:
            self.cgroups.sweep(set(self.local))
        apps = self.apps_known(set(on_disk))
        if apps is None:
            return  # the API is away: remove nothing on a guess
        todo = cleanup.plan(on_disk, apps, in_use)
        bundles = self.paths.downloads
        for app, digest in todo.releases:
            log.info("removing release %s of %s: unused", digest[:12], app)
            remove_tree(self.paths.releases / app / digest)
            (bundles / f"{digest}.tar.gz").unlink(missing_ok=True)
        for app, removal in list(self.removing.items()):
            if removal.done():
                del self.removing[app]
                if (exc := removal.exception()) is not None:
                    log.error("removing what deleted app %s left failed: %r", app, exc)
        for app in todo.apps:
            if app not in self.removing:
                self.removing[app] = self.remover.submit(self.remove_app, app, on_disk[app])

    def remove_app(self, app: str, digests: set[str]) -> None:
        """What a deleted app left here: its user first (while that fails, still running,
        the rest stays, to be tried again at the next cleanup), then its releases, home
        and bundles (the remover's thread)."""
        try:
            users.remove(app, prefix=self.spec.user_prefix)
        except OSError as exc:
            log.warning("%s was deleted, but %s; trying again later", app, exc)
            return
        log.info("removing what deleted app %s left here", app)
        for digest in digests:
            (self.paths.downloads / f"{digest}.tar.gz").unlink(missing_ok=True)
        remove_tree(self.paths.releases / app)
        remove_tree(self.paths.state / "homes" / app)

    def clean_layers(self) -> None:
        """Drop the overlay folders of instances no longer here (a run's after a day)."""
        layers = self.paths.layers
        for layer in layers.iterdir() if layers.exists() else ():
            if layer.name in self.local or (".run." in layer.name and
                                            time.time() - layer.stat().st_mtime < 86400):
                continue
            shutil.rmtree(layer, ignore_errors=True)

    # --- desired --------------------------------------------------------------------------

    def read_desired(self, force: bool = False) -> None:
        """Read the desired state through the API if it moved past ours (or when forced)."""
        now = self.clock()
        self.desired_read = now
        self.desired_due = now + self.timing.desired_every
        try:
            snapshot = self.api.desired(0 if force else max(self.desired_version, 0))
        except ApiError as exc:
            log.warning("desired state not read: %s", exc)
            return
        if snapshot["changed"] or self.desired_version < 0:
            self.fleet = fleet_of(snapshot)
            self._save_desired(snapshot)
        self.desired_version = snapshot["version"]

    def apps_known(self, names: set[str]) -> dict[str, App] | None:
        """The apps of these names that exist (None: cannot tell now)."""
        unknown = sorted(names - set(self.fleet.apps))
        if not unknown:
            return self.fleet.apps
        try:
            snapshot = self.api.desired(0, unknown[:200])
        except ApiError as exc:
            log.warning("cannot tell which apps still exist: %s", exc)
            return None
        return {**fleet_of(snapshot).apps, **self.fleet.apps}

    def _load_desired(self) -> None:
        """The last desired state read, kept so a restart while the API is away keeps the
        apps running (0600: it holds the apps' config vars)."""
        path = self.paths.state / "desired.json"
        try:
            snapshot = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        self.fleet, self.desired_version = fleet_of(snapshot), snapshot.get("version", 0)

    def _save_desired(self, snapshot: dict[str, Any]) -> None:
        path = self.paths.state / "desired.json"
        part = path.with_name(".desired.json.part")
        part.touch(mode=0o600)
        part.write_text(json.dumps(snapshot))
        part.replace(path)

    def wants(self) -> dict[str, Want]:
        """The placements on this host, with command and config resolved from the release."""
        out = {}
        for p in self.fleet.placements.values():
            if p.host_id != self.spec.host_id:
                continue
            app = self.fleet.apps.get(p.app)
            release = app.releases.get(p.release) if app else None
            if app is None or release is None or p.process_type not in release.procfile:
                continue
            config = app.config_at(release.config_version)
            if release.slug is None:
                continue  # placed only once built; never run unbuilt code
            out[p.instance_id] = Want(p.instance_id, p.app, p.release, p.process_type, p.port,
                                      release.slug, release.procfile[p.process_type],
                                      tuple(sorted(config.items())),
                                      app.sizes.get(p.process_type, DEFAULT_SIZE))
        return out

    def adopt(self, wants: dict[str, Want]) -> None:
        """Take over the processes a previous agent started; drop records of dead ones."""
        for rec in self.procs.records():
            if self.procs.alive(rec):
                log.info("adopting %s (pid %s)", rec.instance_id, rec.pid)
                self.local[rec.instance_id] = Local(rec.instance_id, State.STARTING, rec.pid,
                                                    want=wants.get(rec.instance_id),
                                                    started_at=self.clock())
            else:
                self.procs.forget(rec.instance_id)

    # --- observed -------------------------------------------------------------------------

    def observe(self, wants: dict[str, Want], now: float) -> None:
        for iid, loc in list(self.local.items()):
            if loc.state in ALIVE and loc.pid is not None:
                exited, code, sig = self.procs.exit_status(loc.pid)
                if not exited:
                    continue
                self.procs.forget(iid)
                reason = cgroups.ended(self.cgroups, iid, loc.want.size if loc.want else "")
                self.procs.drained(iid)  # its last lines written before the tail is read
                if loc.want is not None:  # its processes are gone: ours again, at once
                    self.ports.hold(loc.want.port)
                if loc.state is State.STOPPING:
                    del self.local[iid]
                    self.report(iid, "InstanceStopped", reason="no longer placed here")
                else:
                    phase = loc.want is not None and loc.want.process_type == RELEASE_PHASE
                    tail = self.procs.tail(iid, PHASE_TAIL if phase else INSTANCE_TAIL)
                    self.report_exit(iid, code, sig, tail, now, reason)
            elif loc.state is State.PREPARING and self.preparing[iid].done():
                future = self.preparing.pop(iid)
                if iid not in wants:
                    del self.local[iid]
                elif (exc := future.exception()) is not None:
                    self.report_exit(iid, None, None, [str(exc)], now)
                else:
                    try:
                        self.launch(loc, *future.result())
                    except (OSError, subprocess.SubprocessError) as exc:
                        self.report_exit(iid, None, None, [f"cannot start: {exc}"], now)

    def report_exit(self, iid: str, code: int | None, sig: int | None, tail: list[str],
                    now: float, reason: str = "") -> None:
        loc = self.local.get(iid)
        if loc is None:
            return
        after_exit(loc, code, now)
        log.info("%s exited (code %s, signal %s, restarts %s)", iid, code, sig, loc.restarts)
        self.report(iid, "InstanceExited", exit_code=code, signal=sig, restarts=loc.restarts,
                    log_tail=tail[-PHASE_TAIL:], reason=reason)

    def report(self, iid: str, type_: str, **data: Any) -> None:
        """Through the outbox: kept on disk first, sent in order (now, or once the API is
        back), recorded once."""
        self.outbox.put({"instance_id": iid, "type": type_,
                         "data": {"host_id": self.spec.host_id, **data}})
        self.outbox.flush(self.send)

    def send(self, item: dict[str, Any]) -> None:
        if "run" in item:
            self.api.run_ended(item["run"]["app"], item["run"]["number"], item["data"],
                               item["key"])
        else:
            self.api.report(item["instance_id"], item["type"], item["data"], item["key"])

    def heartbeat(self) -> None:
        """Say the host is alive; read the desired state at once if the reply says it
        moved. Not kept while the API is away: a late heartbeat says nothing."""
        mem = psutil.virtual_memory()
        running = sum(1 for loc in self.local.values() if loc.state in ALIVE)
        try:
            desired = self.api.heartbeat({
                "load": os.getloadavg()[0], "memory_used_mb": (mem.total - mem.available) // 2**20,
                "memory_total_mb": mem.total // 2**20, "instances": running})
        except ApiError as exc:
            log.warning("heartbeat not sent: %s", exc)
            return
        if desired > self.desired_version:
            self.desired_due = self.clock()

    # --- acting ---------------------------------------------------------------------------

    def apply(self, action: Action, now: float) -> None:
        iid = action.instance_id
        loc = self.local.get(iid)
        if action.kind is Do.PREPARE:
            assert action.want is not None
            restarts = loc.restarts if loc else 0
            codes = loc.exit_codes if loc else []
            self.local[iid] = Local(iid, State.PREPARING, restarts=restarts, want=action.want,
                                    exit_codes=codes)
            self.preparing[iid] = self.pool.submit(self.prepare, action.want)
        elif action.kind is Do.CHECK and loc is not None:
            verdict = self.checks.pop(iid).result()  # submitted with the round's plan
            if verdict.answered:
                self.traffic.checked[iid] += 1  # gunicorn served (and counted) it
            if (not verdict.ok and loc.state is State.STARTING and loc.pid is not None
                    and action.want is not None and action.want.process_type == "web"
                    and now - loc.started_at > self.timing.boot_timeout):
                bound = verdict.message.endswith("not bound")
                self.kill_saying(loc.pid, iid, (
                    f"port {action.want.port} not bound after "
                    f"{self.timing.boot_timeout:g} s" if bound else
                    f"not healthy after {self.timing.boot_timeout:g} s: {verdict.message}"))
                return
            outcome = after_check(loc, verdict.ok, now, self.timing.health_every)
            if outcome == "healthy":
                self.report(iid, "InstanceHealthy")
            elif outcome == "kill" and loc.pid is not None:
                self.kill_saying(loc.pid, iid, f"health check failed {FAILED_CHECKS} times "
                                               f"in a row: {verdict.message}")
        elif action.kind is Do.STOP and loc is not None and loc.pid is not None:
            self.procs.signal_group(loc.pid, 15)
            loc.state, loc.stop_deadline = State.STOPPING, now + self.timing.grace
        elif action.kind is Do.KILL and loc is not None and loc.pid is not None:
            self.procs.signal_group(loc.pid, 9)
        elif action.kind is Do.FORGET:
            self.local.pop(iid, None)
            self.procs.forget(iid)

    def kill_saying(self, pid: int, iid: str, why: str) -> None:
        """Kill an instance, saying why in its log (its last lines reach `why` and `ps`)."""
        log.warning("%s: %s: killing it", iid, why)
        self.procs.say(iid, f"{why}: killed")
        self.procs.signal_group(pid, 9)

    def prepare(self, want: Want) -> tuple[Path, users.AppUser | None]:
        """The release's slug, unpacked once on this host and owned by the app's user, and
        that user (worker thread: may download). The folder above the slugs is closed to
        apps: an instance reaches its slug only through its overlay at /app."""
        home = self.paths.state / "homes" / want.app
        app = self.fleet.apps.get(want.app)
        if (removal := self.removing.get(want.app)) is not None:
            wait([removal])  # an earlier app of that name, deleted: gone before this one
        user = users.ensure(want.app, home, app.uid if app else None,
                            self.spec.user_prefix)
        if user is not None and self.paths.bundles.exists():
            self.paths.bundles.chmod(0o700)  # every app's code: not for apps to browse
        into = self.paths.releases / want.app
        into.mkdir(parents=True, exist_ok=True)
        into.chmod(0o700)
        owner = (user.uid, user.gid) if user is not None else None
        return slug.unpack(self.slug_of(want), want.digest, into, owner), user

    def slug_of(self, want: Want) -> Path:
        """The release's slug file: downloaded from the API, or the shared store's."""
        if self.paths.api and self.paths.api_token:
            return bundle.download(self.paths.api, self.paths.api_token, want.app,
                                   want.release, want.digest, self.paths.downloads, kind="slug")
        return self.paths.bundles / f"{want.digest}.tar.gz"

    def launch(self, loc: Local, release: Path, user: users.AppUser | None) -> None:
        want = loc.want
        assert want is not None
        env = self.environment(want)
        if user is not None:  # made this round: the round's rules must name it already
            self.uids[want.app] = user.uid
        self.confine_network(want, user)
        bound = self.ports.binding(want.process_type, want.command, want.port,
                                   set(netrules.app_uids(self.fleet.apps,
                                                         self.spec.user_prefix).values()))
        if want.process_type == "web" or bound.pass_fds:
            env["GUNICORN_CMD_ARGS"] = (f"{bound.gunicorn_bind} "
                                        f"{self.statsd.gunicorn_args(want.instance_id)} "
                                        + ports.strip_binds(env.get("GUNICORN_CMD_ARGS", "")))
        owner = (user.uid, user.gid) if user is not None else (os.getuid(), os.getgid())
        layer = runtime.fresh_layer(self.paths.layers / want.instance_id, *owner,
                                    size_of(want.size).disk_mb)
        setup = cgroups.confine(self.cgroups, want.instance_id, want.size, runtime.child_setup(
            release, layer, demote(user) if user else None))
        loc.pid = self.procs.start(want.instance_id, want.port,
                                   ["/bin/bash", "-c", bound.command], layer.upper, env,
                                   self.limits,
                                   setup, pass_fds=bound.pass_fds)
        self.ports.handed(want.port, bound)
        loc.state, loc.started_at = State.STARTING, self.clock()
        self.report(want.instance_id, "InstanceStarted", pid=loc.pid)

    def environment(self, want: Want) -> dict[str, str]:
        """What an app process sees: Heroku's (HOME=/app, the slug's virtualenv first on
        PATH), its config vars, PORT."""
        return {**runtime.environment(), **dict(want.config), "PORT": str(want.port),
                "TALLY_APP": want.app, "TALLY_RELEASE": str(want.release),
                "TALLY_INSTANCE": want.instance_id}

    def one_off(self, app: str, number: int) -> Want:
        """A Want for a one-off command of release `number` (the API chose it: `tally run`)."""
        a = self.fleet.apps.get(app)
        r = a.releases.get(number) if a else None
        if not a or not r or not r.slug:
            raise LookupError(f"app {app!r} has no built release v{number} to run a command in")
        return Want(f"{app}.{number}.run.{uuid.uuid4().hex[:12]}", app, number, "run", 0,
                    r.slug or "", "", tuple(sorted(a.config_at(r.config_version).items())))

    def prepare_run(self, app: str, number: int
                    ) -> tuple[str, dict[str, str], Callable[[], None] | None]:
        """Folder, environment and child setup for a one-off command (a run's own thread):
        the slug at /app in an overlay of the run's own, as an instance has. The agent may
        not have folded the release the API saw yet: its loop (which alone folds) gets a
        few seconds to."""
        deadline = time.monotonic() + 10
        self.desired_due = 0.0  # the API put the run's release in our desired state: read it
        while (number not in getattr(self.fleet.apps.get(app), "releases", {})
               and time.monotonic() < deadline):
            time.sleep(0.1)
        want = self.one_off(app, number)
        release, user = self.prepare(want)
        self.confine_network(want, user)
        owner = (user.uid, user.gid) if user is not None else (os.getuid(), os.getgid())
        layer = runtime.fresh_layer(self.paths.layers / want.instance_id, *owner,
                                    size_of(want.size).disk_mb)
        return str(layer.upper), self.environment(want), cgroups.confine(
            self.cgroups, want.instance_id, want.size,
            runtime.child_setup(release, layer, demote(user) if user else None))

    def run_ended(self, ticket: Ticket, code: int | None, seconds: float) -> None:
        """A one-off run ended (a run's thread): its report waits for the loop, which alone
        writes the outbox."""
        self.ended_runs.put((ticket.app, ticket.number, {
            "run_id": ticket.run_id, "exit_code": code, "seconds": round(seconds, 3)}))

    def record_run_ends(self) -> None:
        """Report the runs that ended through the outbox (the API appends RunEnded to the
        app's stream; the run's start is the API's own)."""
        while True:
            try:
                app, number, data = self.ended_runs.get_nowait()
            except queue.Empty:
                return
            self.outbox.put({"run": {"app": app, "number": number}, "data": data})
            self.outbox.flush(self.send)

    def health(self, want: Want | None) -> health.Verdict:
        """Heroku's rule: a web instance is up when its port accepts connections; with
        TALLY_HEALTHCHECK_PATH in its config, when that path answers the expected status.
        Other process types: up while running (a release phase: when it exits 0)."""
        if want is None or want.process_type != "web":
            return health.Verdict(want is not None and want.process_type != "release", "")
        check = health.Check.from_config(dict(want.config), self.timing.health_timeout)
        return health.probe(self.spec.address, want.port, check)


GONE = ".gone-"


def remove_tree(path: Path) -> None:
    """Remove a folder, read-only releases included. Renamed out of the way first, in one
    step: a release folder that exists is always whole (bundle.unpack trusts it), even if
    the agent is killed halfway through; the next cleanup finishes the `.gone-` rest."""
    if not path.name.startswith(GONE):
        try:
            path = path.rename(path.with_name(f"{GONE}{path.name}-{uuid.uuid4().hex[:8]}"))
        except FileNotFoundError:
            return
    bundle.make_writable(path)
    shutil.rmtree(path, ignore_errors=True)


def demote(user: users.AppUser) -> Callable[[], None]:
    """Become the app's user in the child, after the limits are set as root."""
    def demote() -> None:
        os.setgroups([])
        os.setgid(user.gid)
        os.setuid(user.uid)

    return demote
