"""Patroni's and etcd's configuration as tally writes it, and the pid-file wrapper, without
starting either (tests/integration/test_ha.py runs the real ones)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ledger.patroni import ETCD_PREFIX, HASpec, patroni_config, writes_pid

SECRETS = {"postgres": "pg", "tally_replicator": "rep", "patroni_api": "api"}


def spec(tmp_path: Path, watchdog: str = "off") -> HASpec:
    return HASpec(tmp_path, "tally-test", ("a", "b"), (5001, 5002), (8001, 8002), (2379, 2380),
                  watchdog=watchdog)


def test_a_cluster_made_with_etcd_passwords_gives_patroni_its_user(tmp_path: Path) -> None:
    with_auth = patroni_config(spec(tmp_path), "b", {**SECRETS, "etcd_tally": "s3cret"})
    assert with_auth["etcd3"] == {"hosts": ["127.0.0.1:2379"], "username": "tally",
                                  "password": "s3cret"}
    assert with_auth["namespace"] == ETCD_PREFIX and with_auth["scope"] == "tally-test"
    # A cluster made before etcd had users keeps talking to it without one.
    assert "username" not in patroni_config(spec(tmp_path), "b", SECRETS)["etcd3"]


def test_replicas_clone_with_a_fast_checkpoint_and_rewind_with_progress(tmp_path: Path) -> None:
    conf = patroni_config(spec(tmp_path), "a", SECRETS)["postgresql"]
    assert {"checkpoint": "fast"} in conf["basebackup"]
    assert conf["bin_name"] == {"pg_rewind": str(tmp_path / "run" / "pg_rewind")}
    assert conf["listen"] == "127.0.0.1:5001" and conf["data_dir"] == str(tmp_path / "a")


def test_the_watchdog_is_off_unless_the_spec_asks(tmp_path: Path) -> None:
    assert patroni_config(spec(tmp_path), "a", SECRETS)["watchdog"] == {"mode": "off"}
    assert patroni_config(spec(tmp_path, watchdog="required"), "a",
                          SECRETS)["watchdog"] == {"mode": "required"}


def test_a_process_records_its_own_pid_over_a_stale_file(tmp_path: Path) -> None:
    pid_file = tmp_path / "etcd.pid"
    pid_file.write_text("1\n")
    proc = subprocess.run(writes_pid(pid_file, ["/bin/sh", "-c", "echo $$"]),
                          capture_output=True, text=True, check=True)
    # exec keeps the pid: the file names the program itself, not a shell around it.
    assert pid_file.read_text().strip() == proc.stdout.strip()
    assert not (tmp_path / "etcd.pid.new").exists()


def test_root_signals_no_process_a_pid_file_names_unless_it_is_the_clusters_user(
        tmp_path: Path) -> None:
    """The pid files are the cluster user's (postgres) to write: one naming a process of
    another user (here root's own test process) is not believed, so root kills nothing
    of the platform's on its word."""
    import os

    from ledger.patroni import HA

    ha = HA(spec(tmp_path), SECRETS)
    ha.run_dir.mkdir()
    ha.pid_file("etcd").write_text(str(os.getpid()))
    expected_none = os.geteuid() == 0  # as root the cluster's user is postgres, not us
    assert (ha.pid("etcd") is None) == expected_none
