"""The backup agent's pure parts: GFS retention with a clock we set, cron schedules and the
runs due while no agent ran, the fold of backup events, WAL segment names."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from agents.backups import gfs
from agents.backups.jobs import new_backup_id
from agents.backups.restore import Target, choose, parse_target
from agents.backups.schedule import Job, cron_trigger, due_runs, last_fire
from agents.backups.state import finals, fold, retention_view
from agents.backups.walcheck import wal_segment
from ledger.events import RecordedEvent

T0 = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)  # a Monday


def hourly_backups(hours: int, verified: bool = True) -> list[gfs.Backup]:
    return [gfs.Backup(f"b{h:04d}", T0 + timedelta(hours=h), verified) for h in range(hours)]


def test_gfs_keeps_exactly_the_newest_of_each_recent_hour_day_week_and_month() -> None:
    backups = hourly_backups(24 * 70)  # ten weeks of hourly backups
    policy = gfs.Policy(hourly=3, daily=2, weekly=2, monthly=3)
    newest = T0 + timedelta(hours=24 * 70 - 1)
    kept = gfs.kept(backups, policy)
    by_time = {b.backup_id: b.taken_at for b in backups}
    expected_times = {
        newest, newest - timedelta(hours=1), newest - timedelta(hours=2),  # hourly
        newest.replace(hour=23) - timedelta(days=1),  # daily: yesterday's last
        # weekly: the last of the week before (a Sunday 23:00)
        max(t for t in by_time.values() if t.isocalendar()[:2] != newest.isocalendar()[:2]),
        # monthly: the last of March and of April (May is the newest's own month)
        datetime(2026, 3, 31, 23, tzinfo=UTC), datetime(2026, 4, 30, 23, tzinfo=UTC),
    }
    assert {by_time[i] for i in kept} == expected_times
    assert set(gfs.prunable(backups, policy)) == set(by_time) - kept


def test_gfs_prunes_nothing_while_the_newer_backup_is_unverified() -> None:
    policy = gfs.Policy(hourly=1, daily=0, weekly=0, monthly=0)
    old = gfs.Backup("old", T0, True)
    new = gfs.Backup("new", T0 + timedelta(hours=1), False)
    assert gfs.prunable([old, new], policy) == []
    assert gfs.prunable([old, gfs.Backup("new", new.taken_at, True)], policy) == ["old"]


def test_gfs_never_prunes_an_unverified_backup_and_always_keeps_the_newest_good() -> None:
    policy = gfs.Policy(hourly=0, daily=0, weekly=0, monthly=0)
    backups = [gfs.Backup("a", T0, True), gfs.Backup("b", T0 + timedelta(hours=1), False),
               gfs.Backup("c", T0 + timedelta(hours=2), True)]
    assert gfs.kept(backups, policy) == {"c"}
    assert gfs.prunable(backups, policy) == ["a"]


def test_policy_text() -> None:
    assert gfs.Policy.parse("hourly=2, monthly=0") == gfs.Policy(hourly=2, monthly=0)
    for bad in ("yearly=3", "hourly=x", "hourly"):
        with pytest.raises(ValueError, match="expected hourly=N"):
            gfs.Policy.parse(bad)


def test_cron_last_fire_and_bad_lines() -> None:
    now = datetime(2026, 12, 6, 9, 41, 30, tzinfo=UTC)
    assert last_fire(cron_trigger("0 * * * *"), now) == now.replace(minute=0, second=0)
    assert last_fire(cron_trigger("*/20 * * * * *"), now) == now.replace(second=20)
    assert last_fire(cron_trigger("0 0 1 1 *"), now) == datetime(2026, 1, 1, tzinfo=UTC)
    for bad in ("* * *", "61 * * * *"):
        with pytest.raises(ValueError, match=re.escape(bad)):
            cron_trigger(bad)


def test_a_run_due_while_no_agent_ran_is_due_once() -> None:
    now = datetime(2026, 12, 6, 9, 41, tzinfo=UTC)
    jobs = [Job("ledger", "0 * * * *"), Job("addons", "30 3 * * *")]
    claimed = {"ledger": "2026-12-06T08:00:00+00:00", "addons": "2026-12-06T03:30:00+00:00"}
    due = due_runs(jobs, claimed.get, now)
    assert [(j.name, t) for j, t in due] == [("ledger", "2026-12-06T09:00:00+00:00")]
    claimed["ledger"] = "2026-12-06T09:00:00+00:00"
    assert due_runs(jobs, claimed.get, now) == []
    assert [j.name for j, _ in due_runs(jobs, lambda name: None, now)] == ["ledger", "addons"]


def _event(pos: int, type_: str, **data: object) -> RecordedEvent:
    return RecordedEvent(pos, pos, "backup-ledger", pos, type_, {"target": "ledger", **data},
                         {}, T0 + timedelta(minutes=pos))


def test_fold_counts_only_verified_backups_as_good() -> None:
    done = {"size_bytes": 1, "location": "x", "digest": "0" * 64}
    backups = fold([
        _event(1, "BackupStarted", backup_id="a"), _event(2, "BackupCompleted", backup_id="a",
                                                           **done),
        _event(3, "BackupVerified", backup_id="a"),
        _event(4, "BackupStarted", backup_id="b"), _event(5, "BackupCompleted", backup_id="b",
                                                           **done),
        _event(6, "BackupFailed", backup_id="b", error="pg_verifybackup: checksum mismatch"),
        _event(7, "BackupStarted", backup_id="c"),
    ])
    assert {k: b.state for k, b in backups.items()} == {"a": "verified", "b": "failed",
                                                         "c": "running"}
    view = retention_view(backups.values(), "ledger")
    assert [(b.backup_id, b.verified) for b in view] == [("a", True), ("c", False)]


def test_names() -> None:
    assert new_backup_id("addon:blog", "2026-12-06T09:00:00+00:00", T0) == \
        "addon-blog-20261206T090000Z"
    assert wal_segment(1, "0/4000028") == "000000010000000000000004"
    assert wal_segment(3, "1/FF000000") == "0000000300000001000000FF"


def test_restore_target_and_choice() -> None:
    assert parse_target("120") == Target(position=120)
    assert parse_target("2026-12-06T09:30:00Z").time == datetime(2026, 12, 6, 9, 30,
                                                                  tzinfo=UTC)
    for bad in ("yesterday", "2026-12-06T09:30:00"):
        with pytest.raises(ValueError, match="--at"):
            parse_target(bad)
    backups = [{"backup_id": f"b{i}", "finished_at": (T0 + timedelta(hours=i)).isoformat(),
                "verified": {"position": 100 * i}} for i in range(3)]
    assert choose(backups, Target(position=150))["backup_id"] == "b1"
    assert choose(backups, Target(time=T0 + timedelta(minutes=90)))["backup_id"] == "b1"
    assert choose(backups, Target())["backup_id"] == "b2"


def test_a_destroyed_addons_backups_are_kept_for_the_operators_period_then_pruned() -> None:
    done = {"size_bytes": 1, "location": "x", "digest": "0" * 64}

    def ran(pos: int, bid: str, target: str, job: str) -> list[RecordedEvent]:
        return [RecordedEvent(pos, pos, f"backup-{target}", 1, t, {
            "target": target, "backup_id": bid, "job": job, **extra}, {},
            T0 + timedelta(days=pos)) for t, extra in (
                ("BackupStarted", {}), ("BackupCompleted", done), ("BackupVerified", {}))]

    backups = fold([*ran(1, "a1", "addon:gone", "addons"), *ran(2, "a2", "addon:gone", "final"),
                    *ran(3, "b1", "addon:kept", "addons")])
    gone = finals(backups.values())
    assert sorted(b.backup_id for b in gone) == ["a1", "a2"]
    assert retention_view(backups.values(), "addon:gone")[0].backup_id == "a1"
    assert gfs.expired(gone, T0 + timedelta(days=20), timedelta(days=18)) == ["a1"]
    assert gfs.expired(gone, T0 + timedelta(days=20), timedelta(days=30)) == []


def test_wal_gaps_are_the_segments_missing_after_the_first_needed_across_timelines() -> None:
    from agents.backups.walcheck import Gap, cuts, gaps, summary

    names = ["000000010000000000000003", "000000010000000000000004",
             "000000010000000000000007", "000000020000000000000008",
             "00000002.history", "000000010000000000000008.partial"]
    assert gaps(names, "000000010000000000000003") == [
        Gap("000000010000000000000005", "000000010000000000000006")]
    assert gaps(names, "000000010000000000000002")[0] == Gap("000000010000000000000002",
                                                             "000000010000000000000002")
    assert gaps(names, "000000010000000000000007") == []
    assert gaps(names, "000000010000000000000009") == [], "not written yet: no gap"
    # the low word rolls over at 0xFF into the next high word
    assert gaps(["0000000100000000000000FF", "000000010000000100000000"],
                "0000000100000000000000FE") == [Gap("0000000100000000000000FE",
                                                    "0000000100000000000000FE")]
    found = cuts(names, {"b1": "000000010000000000000003", "b2": "000000010000000000000007"})
    assert found == [(Gap("000000010000000000000005", "000000010000000000000006"), ["b1"])]
    assert "MISSING 000000010000000000000005..000000010000000000000006" in summary(
        names, {"b1": "000000010000000000000003"})
    assert summary(names, {"b2": "000000010000000000000007"}).endswith("no gap")
