"""Backup benchmark: tally's base backup and restore beside PostgreSQL's own, and the cost
of verifying a backup.

    .venv/bin/python bench/backups.py [--quick]

One ledger cluster (primary + synchronous standby, WAL archived) filled with events
(`--mb`: config changes of 1 KiB, kept by the digest). In alternating rounds of the same cluster:
- backup: tally's base backup (`agents/backups/base.py`: pg_basebackup with WAL and a
  manifest into the repository, then sized and its manifest hashed) beside a plain
  `pg_basebackup -X stream -c fast` into a folder; MB/s of the data folder copied.
- restore: tally's restore (`agents/backups/restore.py`: copy with progress, stage the
  archived WAL, archive recovery on a scratch port, promote) beside a plain restore (copy
  the same backup folder, `pg_ctl start -w`); MB/s. Also tally's restore with `--check`
  (then count and digest the events), beside the same plain figure.
- verify: `agents/backups/verify.py` (pg_verifybackup, copy, start, digest here and on the
  live ledger), seconds per GB of backup.
Each timed case starts after a `sync`, and the two restores take turns going first. Each
round's pair goes to stderr. Ends with one JSON line: backup_ratio, restore_ratio,
verify_s_per_gb (and the figures they come from).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import migrations  # noqa: E402
from agents.backups import base, verify  # noqa: E402
from agents.backups.repository import SPOOL, Repository, archive_command, tree_size  # noqa: E402
from agents.backups.restore import Target, restore  # noqa: E402
from agents.backups.scratch import ScratchServer, chown_tree, copy_tree  # noqa: E402
from ledger import Ledger, NewEvent  # noqa: E402
from ledger.cluster import Cluster, ClusterSpec  # noqa: E402
from tests.conftest import destroy_cluster, free_ports  # noqa: E402


def cluster_with_archive() -> Cluster:
    home = Path(tempfile.mkdtemp(prefix="tally-bench-backups-"))
    home.chmod(0o755)
    root = home / "ledger"
    a, b = free_ports(2)
    cluster = Cluster(ClusterSpec(root, ports=(a, b),
                                  archive_command=archive_command(root / "run" / SPOOL)))
    cluster.init()
    migrations.upgrade(cluster.dsn("tally_owner"))
    return cluster


def fill(cluster: Cluster, mb: int) -> int:
    """About `mb` MB of events, in batches of 1,000; returns the head."""
    with Ledger(cluster.dsn()) as ledger:
        for i in range(max(1, mb)):
            ledger.append(f"app-bench{i}", [NewEvent("ConfigChanged", {
                "app": f"bench{i}", "set": {"NOTE": "x" * 1000}, "config_version": v})
                for v in range(1, 1001)])
        return ledger.sequence()


def plain_basebackup(cluster: Cluster, into: Path) -> None:
    subprocess.run([str(cluster.spec.bin_dir / "pg_basebackup"), "-h", cluster.spec.host, "-p",
                    str(cluster.port(cluster.primary())), "-U", "tally_replicator", "-D",
                    str(into), "-X", "stream", "--checkpoint=fast", "--no-password"],
                   env={"PGPASSWORD": cluster.credentials()["tally_replicator"],
                        "PATH": "/usr/bin:/bin"}, check=True, capture_output=True)


def plain_restore(cluster: Cluster, backup: Path, folder: Path) -> None:
    """Copy the folder and start PostgreSQL on it (crash recovery from the backup's WAL)."""
    copy_tree(backup, folder / "data")
    chown_tree(folder, cluster.spec.os_user)
    server = ScratchServer(folder / "data", cluster.spec.bin_dir, cluster.spec.os_user)
    server.start()
    server.stop("immediate")


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    """Seconds `fn` takes, starting with no dirty pages: the kernel makes whoever writes
    next pay for what the last step left unwritten, so each case starts even."""
    os.sync()
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small ledger, 2 rounds (< 120 s)")
    parser.add_argument("--mb", type=int, help="MB of events to fill the ledger with")
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    mb = args.mb or (40 if args.quick else 400)
    rounds = args.rounds or (2 if args.quick else 5)
    cluster = cluster_with_archive()
    work = cluster.root.parent / "bench"
    work.mkdir()
    work.chmod(0o755)
    try:
        head = fill(cluster, mb)
        repo = Repository(cluster.root.parent / "backups").open()
        scratch = cluster.root.parent / "backup-scratch"
        ours_b, plain_b, ours_r, plain_r, ours_c, verify_s = [], [], [], [], [], []
        size = 0
        for r in range(rounds):
            bid = f"bench-{r}"
            t_ours = timed(lambda bid=bid: base.take(cluster, repo, bid, head))
            size = tree_size(repo.base(bid))
            plain = work / f"plain-{r}"
            t_plain = timed(lambda plain=plain: plain_basebackup(cluster, plain))
            plain_size = tree_size(plain)
            ours_b.append(size / t_ours / 1e6)
            plain_b.append(plain_size / t_plain / 1e6)
            verify_s.append(timed(lambda bid=bid: verify.verify(cluster, repo.base(bid),
                                                                scratch, bid)) / (size / 1e9))
            (repo.base_dir / f"{bid}.json").write_text(json.dumps({
                "backup_id": bid, "finished_at": "2000-01-01T00:00:00+00:00",
                "timeline": 1, "start_lsn": base.wal_range(repo.base(bid))[1],
                "verified": {"position": head}}))
            target = work / f"restored-{r}"

            def ours_restore(bid: str = bid, target: Path = target) -> float:
                return timed(lambda: restore(repo, target, Target(), cluster, bid))

            def theirs(r: int = r) -> float:
                return timed(lambda: plain_restore(cluster, repo.base(f"bench-{r}"),
                                                   work / f"plain-restore-{r}"))
            if r % 2:  # each goes first in every other round: the page cache favours neither
                t_plain_r, t_ours_r = theirs(), ours_restore()
            else:
                t_ours_r, t_plain_r = ours_restore(), theirs()
            checked = work / f"checked-{r}"
            t_checked = timed(lambda bid=bid, checked=checked: restore(
                repo, checked, Target(), cluster, bid, check=True))
            ours_c.append(size / t_checked / 1e6)
            ours_r.append(size / t_ours_r / 1e6)
            plain_r.append(size / t_plain_r / 1e6)
            print(f"round {r + 1}: backup {ours_b[-1]:.1f}/{plain_b[-1]:.1f} MB/s, restore "
                  f"{ours_r[-1]:.1f}/{plain_r[-1]:.1f} MB/s (with --check {ours_c[-1]:.1f}), "
                  f"verify {verify_s[-1]:.1f} s/GB", file=sys.stderr)
            for path in (plain, target, checked, work / f"plain-restore-{r}"):
                shutil.rmtree(path, ignore_errors=True)
            repo.remove(bid)
        med = statistics.median
        print(f"ledger {size / 1e6:,.0f} MB (data folder), {rounds} rounds, medians:")
        print(f"{'case':<28}{'tally MB/s':>12}{'plain MB/s':>12}{'ratio':>8}")
        print(f"{'base backup':<28}{med(ours_b):>12.1f}{med(plain_b):>12.1f}"
              f"{med(ours_b) / med(plain_b):>8.2f}")
        print(f"{'restore':<28}{med(ours_r):>12.1f}{med(plain_r):>12.1f}"
              f"{med(ours_r) / med(plain_r):>8.2f}")
        print(f"{'restore --check (+ digest)':<28}{med(ours_c):>12.1f}{med(plain_r):>12.1f}"
              f"{med(ours_c) / med(plain_r):>8.2f}")
        print(f"verify (pg_verifybackup + restore + digest): {med(verify_s):.1f} s per GB")
        print(json.dumps({"backup_ratio": round(med(ours_b) / med(plain_b), 3),
                          "restore_ratio": round(med(ours_r) / med(plain_r), 3),
                          "verify_s_per_gb": round(med(verify_s), 1),
                          "backup_mb_s": round(med(ours_b), 1),
                          "plain_backup_mb_s": round(med(plain_b), 1),
                          "restore_check_ratio": round(med(ours_c) / med(plain_r), 3),
                          "restore_mb_s": round(med(ours_r), 1),
                          "plain_restore_mb_s": round(med(plain_r), 1),
                          "size_mb": round(size / 1e6)}))
    finally:
        destroy_cluster(cluster)


if __name__ == "__main__":
    main()
