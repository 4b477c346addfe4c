"""`tally serve backups`: APScheduler 3 runs the jobs on cron schedules; the agent's main
loop moves archived WAL into the repository every second.

Chosen on purpose, so no run is skipped silently:
- misfire_grace_time None: a run that fires late (the process was busy or paused) still
  runs, however late;
- coalesce: runs that piled up meanwhile run once, not once each;
- max_instances 1: a run still going when the next fires makes APScheduler skip that one,
  which is recorded (BackupFailed, stage `schedule`), never only logged;
- a run due while no agent was up (APScheduler's memory died with it) is found from the
  ledger at start (`due_runs`: the last scheduled time claimed per job) and run once.
Two agents may run side by side: every run is claimed in the ledger by its scheduled time
(agents/backups/jobs.py), so each scheduled run happens once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from agents.backups.jobs import LEDGER, BackupAgent, new_backup_id
from agents.backups.state import last_scheduled
from ledger import LedgerError

log = logging.getLogger("tally.backups")
WAL_CHECK_S = 60.0
"""How often the agent looks for gaps in the WAL archive."""
LOOKBACK = (timedelta(hours=1), timedelta(days=2), timedelta(days=32), timedelta(days=400))


@dataclass(frozen=True)
class Job:
    """A named schedule: `ledger` (base backups) or `addons` (every add-on's dump)."""

    name: str
    cron: str

    def trigger(self) -> CronTrigger:
        return cron_trigger(self.cron)


def cron_trigger(text: str) -> CronTrigger:
    """A crontab line (`0 * * * *`), or six fields with seconds first (`*/20 * * * * *`).
    Raises ValueError naming what is wrong."""
    fields = text.split()
    try:
        if len(fields) == 5:
            return CronTrigger.from_crontab(text, timezone=UTC)
        if len(fields) == 6:
            second, minute, hour, day, month, dow = fields
            return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month,
                               day_of_week=dow, timezone=UTC)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    raise ValueError(f"{text!r}: a cron line has 5 fields (or 6 with seconds first)")


def last_fire(trigger: CronTrigger, now: datetime) -> datetime | None:
    """The latest time at or before `now` the trigger fired (None within 400 days)."""
    for back in LOOKBACK:
        fire, found = trigger.get_next_fire_time(None, now - back), None
        while fire is not None and fire <= now:
            found = fire
            fire = trigger.get_next_fire_time(fire, fire + timedelta(microseconds=1))
        if found is not None:
            return found
    return None


def due_runs(jobs: list[Job], claimed: Callable[[str], str | None],
             now: datetime) -> list[tuple[Job, str]]:
    """The runs due while no agent ran: per job, its latest fire time if no run was
    claimed for it (ISO times, as claims carry them)."""
    out = []
    for job in jobs:
        fire = last_fire(job.trigger(), now)
        if fire is None:
            continue
        last = claimed(job.name)
        if last is None or datetime.fromisoformat(last) < fire:
            out.append((job, fire.isoformat()))
    return out


class Daemon:
    """One backup agent process: the scheduler, the catch-up, and the WAL mover."""

    def __init__(self, agent: BackupAgent, jobs: list[Job], spool: Path | None,
                 wal_every: float = 1.0) -> None:
        self.agent = agent
        self.jobs = {j.name: j for j in jobs}
        self.spool = spool
        self.wal_every = wal_every
        self.stop = threading.Event()
        self.scheduler = BackgroundScheduler(
            timezone=UTC, executors={"default": ThreadPoolExecutor(max(2, len(jobs)))},
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1})
        self.scheduler.add_listener(self._skipped, EVENT_JOB_MAX_INSTANCES)

    def run_job(self, name: str, scheduled_for: str | None = None) -> None:
        """Run one job for its scheduled time (the trigger's latest fire when not given)."""
        job = self.jobs[name]
        if scheduled_for is None:
            fire = last_fire(job.trigger(), datetime.now(UTC))
            scheduled_for = fire.isoformat() if fire else None
        try:
            if name == LEDGER:
                self.agent.run_ledger(scheduled_for, job=name)
            else:
                self.agent.run_addons(scheduled_for, job=name)
        except (LedgerError, OSError) as exc:  # the ledger away: the claim was not made
            log.warning("job %s for %s did not run: %s", name, scheduled_for, exc)

    def check_wal(self) -> None:
        """Look for gaps in the WAL archive (each recorded once as WalGapFound)."""
        try:
            with self.agent.ledger() as ledger:
                self.agent.check_wal(ledger)
        except (LedgerError, OSError) as exc:
            log.warning("the WAL archive could not be checked: %s", exc)

    def _skipped(self, event: JobSubmissionEvent) -> None:
        """A run APScheduler skipped because the previous one still ran: say so."""
        for when in event.scheduled_run_times:
            fire = when.astimezone(UTC).isoformat()
            target = LEDGER if event.job_id == LEDGER else "addons"
            try:
                with self.agent.ledger() as ledger:
                    self.agent.record(ledger, target, "BackupFailed",
                                      backup_id=new_backup_id(target, fire, when),
                                      error="skipped: the previous run of this job was still "
                                            "running", stage="schedule")
            except LedgerError as exc:
                log.warning("could not record the skipped run %s: %s", fire, exc)

    def catch_up(self) -> None:
        """Settle orphaned backups, then run once each job due while no agent ran."""
        self.agent.recover()
        with self.agent.ledger() as ledger:
            backups = self.agent.backups(ledger).values()
        for job, fire in due_runs(list(self.jobs.values()),
                                  lambda name: last_scheduled(backups, name),
                                  datetime.now(UTC)):
            log.info("job %s was due at %s while no agent ran: running it now", job.name, fire)
            self.scheduler.add_job(self.run_job, args=[job.name, fire],
                                   id=f"catch-up-{job.name}")

    def run(self) -> None:
        for job in self.jobs.values():
            self.scheduler.add_job(self.run_job, job.trigger(), args=[job.name], id=job.name,
                                   name=f"backups {job.name} ({job.cron})")
        self.scheduler.start()
        while not self.stop.is_set():
            try:
                self.catch_up()
                log.info("backup agent ready: %s", ", ".join(
                    f"{j.name} at {j.cron}" for j in self.jobs.values()))
                break
            except (LedgerError, OSError) as exc:
                log.warning("ledger unreachable at start, retrying: %s", exc)
                self.stop.wait(2)
        checked = 0.0
        while not self.stop.is_set():
            if time.monotonic() - checked >= WAL_CHECK_S:
                checked = time.monotonic()
                self.check_wal()
            if self.spool is not None:
                try:
                    taken = self.agent.repo.ingest_wal(self.spool)
                    if taken:
                        log.info("archived %s", ", ".join(taken))
                except OSError as exc:
                    log.warning("WAL archive: %s", exc)
            self.stop.wait(self.wal_every)
        self.scheduler.shutdown(wait=False)
        # A check in progress loses its scratch server now (and is recorded as failed);
        # none is left running after the agent.
        root = self.agent.scratch_root
        for folder in root.iterdir() if root.is_dir() else ():
            self.agent.clear_scratch(folder.name)
