"""`tally up`'s supervisor config, restart counting and systemd units, without starting
anything (the e2e test tests/e2e/test_up.py runs the real supervisord)."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from ledger.patroni import Process
from tally import platform, supervise, systemd
from tally.config import Config
from tests.conftest import app_user, session_users

CFG = Config.from_env({"TALLY_HOME": "/srv/tally%home"})
PROGRAMS = [supervise.Program("placer", ["serve", "placer"], {}),
            supervise.Program("agent-1", ["serve", "agent", "--host-id", "h1"],
                              {"TALLY_AGENT_TOKEN": "tly_secret"})]


def test_config_restarts_rotates_and_hands_on_the_settings() -> None:
    text = supervise.config(CFG) + supervise.programs_config(
        CFG, PROGRAMS, {"TALLY_HOME": "/srv/tally%home"})
    parsed = configparser.ConfigParser()
    parsed.read_string(text)  # interpolation on, as supervisord reads it
    agent = parsed["program:agent-1"]
    assert agent["autorestart"] == "true" and int(agent["startretries"]) > 1
    assert agent["command"].endswith("-m tally.cli serve agent --host-id h1")
    assert 'TALLY_AGENT_TOKEN="tly_secret"' in agent["environment"]
    assert 'TALLY_HOME="/srv/tally%home"' in agent["environment"]
    assert agent["stdout_logfile"] == "/srv/tally%home/log/agent-1.log"
    assert int(agent["stdout_logfile_maxbytes"]) > 0 and int(agent["stdout_logfile_backups"])
    assert agent["directory"] == "/"  # TALLY_HOME/ledger would shadow the ledger package
    assert parsed["unix_http_server"]["chmod"] == "0700"
    assert parsed["include"]["files"] == "conf.d/*.conf"


def test_the_ledgers_processes_run_as_their_user_first_with_their_own_environment() -> None:
    """etcd and Patroni under supervisord: their own command (which writes its pid file),
    as postgres, etcd started before and stopped after the Patronis, no TALLY_* settings."""
    processes = [Process("etcd", ["/bin/sh", "-c", "exec etcd"], "postgres", {"LC_ALL": "C"}),
                 Process("patroni-a", ["patroni", "a.yml"], "postgres", {"LC_ALL": "C"})]
    text = supervise.programs_config(CFG, platform.ledger_programs(processes),
                                     {"TALLY_HOME": "/srv/tally%home"})
    parsed = configparser.ConfigParser()
    parsed.read_string(text)
    etcd, patroni = parsed["program:ledger-etcd"], parsed["program:ledger-patroni-a"]
    assert etcd["command"] == "/bin/sh -c 'exec etcd'" and patroni["user"] == "postgres"
    assert etcd["environment"] == 'LC_ALL="C"'
    assert int(etcd["priority"]) < int(patroni["priority"])
    assert patroni["autorestart"] == "true"


def test_a_value_supervisord_cannot_carry_is_refused() -> None:
    bad = [supervise.Program("api", ["serve", "api"], {"X": 'say "hi"'})]
    with pytest.raises(ValueError, match="quote"):
        supervise.programs_config(CFG, bad, {})


def test_restarts_are_the_unexpected_exits_since_supervisord_started() -> None:
    log = "\n".join([
        "2026-12-06 05:00:00,000 INFO supervisord started with pid 10",
        "2026-12-06 05:00:01,000 WARN exited: placer (terminated by SIGKILL; not expected)",
        "2026-12-06 05:10:00,000 INFO supervisord started with pid 20",
        "2026-12-06 05:10:01,000 INFO spawned: 'placer' with pid 21",
        "2026-12-06 05:11:00,000 WARN exited: placer (terminated by SIGKILL; not expected)",
        "2026-12-06 05:12:00,000 WARN exited: relay-1 (exit status 1; not expected)",
        "2026-12-06 05:12:30,000 WARN exited: relay-1 (exit status 0; expected)",
    ])
    assert supervise.restarts(log) == {"placer": ["terminated by SIGKILL"],
                                       "relay-1": ["exit status 1"]}


def test_systemd_units_restart_and_keep_secrets_off_the_unit() -> None:
    units = systemd.units(PROGRAMS)
    assert list(units) == ["tally.target", "tally-placer.service", "tally-agent-1.service"]
    assert "tally-placer.service" in units["tally.target"]
    agent = units["tally-agent-1.service"]
    assert "Restart=always" in agent and "tly_secret" not in agent
    assert f"EnvironmentFile={systemd.ENV_FILE}" in agent and "PartOf=tally.target" in agent
    assert "# /etc/systemd/system/tally.target" in systemd.render(PROGRAMS)


def test_tests_remove_only_the_users_of_their_own_apps() -> None:
    before = {app_user("old")}
    now = {app_user("old"), app_user("mine"), app_user("someone-elses"), "tally-mine"}
    assert session_users(before, now, {"mine", "gone"}) == {app_user("mine")}


def test_status_says_when_tally_is_not_up(tmp_path: Path) -> None:
    with pytest.raises(supervise.SupervisorError, match="not up"):
        supervise.status(Config.from_env({"TALLY_HOME": str(tmp_path)}))


def test_the_configs_are_closed_each_time_they_are_written(tmp_path: Path) -> None:
    """The programs' file holds the agents' tokens: a supervisor folder or file left (or
    made by hand) with looser modes is closed again on the next write, not trusted."""
    cfg = Config.from_env({"TALLY_HOME": str(tmp_path)})
    path = supervise.write_configs(cfg, [], {})
    programs = supervise.part_path(cfg, "platform")
    for folder in {path.parent, programs.parent}:
        folder.chmod(0o755)
    for file in (path, programs):
        file.chmod(0o644)
    supervise.write_configs(cfg, [], {})
    assert {f.stat().st_mode & 0o777 for f in (path.parent, programs.parent)} == {0o700}
    assert {f.stat().st_mode & 0o777 for f in (path, programs)} == {0o600}
