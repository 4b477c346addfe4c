"""The backup agent (`tally serve backups`): scheduled, verified, historical backups of the
ledger (base backups + WAL archive) and of the apps' databases (pg_dump), kept by GFS
retention in a repository the database servers cannot reach.

gfs.py (retention, pure), state.py (the backups folded from the ledger, pure),
repository.py (the folder and the WAL archive), base.py (pg_basebackup), scratch.py (a
server over a copy), verify.py (the check), jobs.py (claim, take, record, verify, prune,
recover), schedule.py (APScheduler and catch-up), restore.py (point-in-time restore).
"""
