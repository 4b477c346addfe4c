"""`tally up`'s daemons under Supervisor (supervisord + its XML-RPC API), on one machine.

`tally up` writes `$TALLY_HOME/supervisor/supervisord.conf`, which includes one file per
part under `conf.d/`: `ledger.conf` (etcd and Patroni, when the ledger runs under Patroni)
and `platform.conf` (the daemon table of tally/platform.py). It starts supervisord, or makes
a running one take a part's new table while the other parts run on untouched.
Supervisor restarts a daemon that dies (kill -9 included); one that dies within
START_SECS of its start is retried with a growing delay (1 s, 2 s, 3 s ...) and given up
after START_RETRIES tries in a row (state FATAL: a crash loop a person must look at). Each
daemon's output goes to `$TALLY_HOME/log/<name>.log`, rotated at LOG_BYTES, LOG_BACKUPS
kept. `tally status` reads the daemons' state from supervisord and counts the restarts
since it started from its own log; `tally down` stops them all and supervisord itself.

On a production host the same daemons run under systemd instead (`tally systemd-units`).
"""

from __future__ import annotations

import http.client
import os
import shlex
import socket
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tally.config import Config

START_SECS = 5
"""A daemon that exits sooner than this after its start is in a crash loop: backoff."""
START_RETRIES = 20
STOP_WAIT_SECS = 30
"""SIGTERM, then this long before SIGKILL (an agent stopping its apps takes a while)."""
LOG_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5


class SupervisorError(OSError):
    """supervisord is not answering, or refused what we asked."""


@dataclass(frozen=True)
class Program:
    """One daemon as Supervisor runs it: `tally <args>` with extra environment, or (`argv`)
    a program of its own, which gets only its own environment. Lower `priority` starts
    first and stops last."""

    name: str
    args: list[str]
    env: dict[str, str]
    argv: list[str] | None = None
    user: str | None = None
    priority: int = 999

    def command(self) -> list[str]:
        if self.argv is not None:
            return list(self.argv)
        return [sys.executable, "-m", "tally.cli", *self.args]


def conf_path(cfg: Config) -> Path:
    return cfg.home / "supervisor" / "supervisord.conf"


def socket_path(cfg: Config) -> Path:
    return cfg.run_dir / "supervisor.sock"


def main_log(cfg: Config) -> Path:
    return cfg.log_dir / "supervisord.log"


def _quote(value: str) -> str:
    """A value as supervisord's config reads it (ConfigParser: `%` is special)."""
    return value.replace("%", "%%")


def _environment(env: dict[str, str]) -> str:
    for key, value in env.items():
        if '"' in value or "\n" in value:
            raise ValueError(f"environment variable {key} holds a quote or a newline: "
                             "supervisord cannot pass it on")
    return ",".join(f'{k}="{_quote(v)}"' for k, v in sorted(env.items()))


def part_path(cfg: Config, part: str) -> Path:
    return conf_path(cfg).parent / "conf.d" / f"{part}.conf"


def config(cfg: Config) -> str:
    """supervisord.conf: the server, its socket and log, and every part's programs."""
    return "\n".join([
        "; written by `tally up`; edits are overwritten at the next one",
        "[unix_http_server]", f"file={_quote(str(socket_path(cfg)))}", "chmod=0700", "",
        "[supervisord]", f"logfile={_quote(str(main_log(cfg)))}",
        f"logfile_maxbytes={LOG_BYTES * 5}", f"logfile_backups={LOG_BACKUPS}",
        f"pidfile={_quote(str(cfg.run_dir / 'supervisord.pid'))}",
        f"childlogdir={_quote(str(cfg.log_dir))}", "loglevel=info", "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "", "[supervisorctl]", f"serverurl=unix://{_quote(str(socket_path(cfg)))}", "",
        "[include]", "files = conf.d/*.conf", "",
    ])


def programs_config(cfg: Config, programs: list[Program], base_env: dict[str, str]) -> str:
    """One part's programs; `base_env` (the TALLY_* settings `tally up` ran with) goes to
    every `tally` program, so a restart runs with the same configuration."""
    lines = ["; written by `tally up`; edits are overwritten at the next one"]
    for p in programs:
        log = _quote(str(cfg.log_dir / f"{p.name}.log"))
        lines += [
            f"[program:{p.name}]", f"command={_quote(shlex.join(p.command()))}",
            f"environment={_environment(p.env if p.argv else {**base_env, **p.env})}",
            "directory=/",  # not TALLY_HOME: its ledger/ folder would shadow the package
            *([f"user={p.user}"] if p.user else []), f"priority={p.priority}",
            "autostart=true", "autorestart=true", f"startsecs={START_SECS}",
            f"startretries={START_RETRIES}", "stopsignal=TERM",
            f"stopwaitsecs={STOP_WAIT_SECS}", "killasgroup=true",
            "redirect_stderr=true", f"stdout_logfile={log}",
            f"stdout_logfile_maxbytes={LOG_BYTES}", f"stdout_logfile_backups={LOG_BACKUPS}",
            "",
        ]
    return "\n".join(lines)


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__()
        self.path, self.timeout = str(path), timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        self.close()  # one connection at a time, closed with the proxy
        conn = http.client.HTTPConnection("localhost", timeout=self.timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        conn.sock = sock
        self._connection = (host, conn)
        return conn


@contextmanager
def rpc(cfg: Config, timeout: float = 10.0) -> Iterator[Any]:
    """supervisord's XML-RPC interface (`supervisor.*` calls), over its private Unix
    socket; the connection is closed on leaving."""
    proxy = xmlrpc.client.ServerProxy("http://localhost/RPC2",
                                      transport=_UnixTransport(socket_path(cfg), timeout))
    with proxy:
        yield proxy.supervisor


def running(cfg: Config) -> bool:
    """Whether supervisord answers on its socket. No socket, or no one on it, is a quick
    no; a supervisord that is there but slow (a loaded machine) is given 30 s to say so."""
    try:
        with rpc(cfg, 30.0) as server:
            state: str = server.getState()["statename"]
        return state == "RUNNING"
    except (OSError, xmlrpc.client.Error):
        return False


def write_configs(cfg: Config, programs: list[Program], base_env: dict[str, str],
                  part: str = "platform") -> Path:
    """Write supervisord's file and the part's programs. The programs' file holds the
    agents' tokens, so its folders are closed to 0700 and the files to 0600 each time,
    also when an earlier run or a person left them looser."""
    path, programs_path = conf_path(cfg), part_path(cfg, part)
    for folder in (cfg.run_dir, cfg.log_dir):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for folder in (path.parent, programs_path.parent):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder.chmod(0o700)
    for file, text in ((path, config(cfg)),
                       (programs_path, programs_config(cfg, programs, base_env))):
        file.touch(mode=0o600)
        file.chmod(0o600)
        file.write_text(text)
    return path


def up(cfg: Config, programs: list[Program], base_env: dict[str, str],
       timeout: float = 30.0, part: str = "platform") -> None:
    """Run these programs as `part` under supervisord: start it, or have the running one
    take the part's new table (added programs start, removed ones stop, changed ones
    restart; other parts' programs run on)."""
    path = write_configs(cfg, programs, base_env, part)
    if not running(cfg):
        subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-c", str(path)],
                       check=True, timeout=timeout, stdin=subprocess.DEVNULL,
                       capture_output=True)
        _wait(lambda: running(cfg), timeout, "supervisord did not answer on "
              f"{socket_path(cfg)}: see {main_log(cfg)}")
        return
    with rpc(cfg, timeout + STOP_WAIT_SECS) as server:
        [[added, changed, removed]] = server.reloadConfig()
        for name in [*changed, *removed]:
            server.stopProcessGroup(name, True)
            server.removeProcessGroup(name)
        for name in [*changed, *added]:
            server.addProcessGroup(name)


def down(cfg: Config, timeout: float = 60.0) -> list[str]:
    """Stop every program (SIGTERM, SIGKILL after STOP_WAIT_SECS), then supervisord.
    Returns the names that were running."""
    if not running(cfg):
        return []
    with rpc(cfg, timeout) as server:
        names = [i["name"] for i in server.getAllProcessInfo() if i["pid"]]
        server.stopAllProcesses(True)
        server.shutdown()
    _wait(lambda: not socket_path(cfg).exists() and not running(cfg), timeout,
          "supervisord did not stop")
    return names


def status(cfg: Config, now: datetime | None = None) -> list[dict[str, Any]]:
    """Each daemon: state, pid, uptime, restarts since supervisord started (crashes it
    recovered from), and how the last one ended."""
    if not running(cfg):
        raise SupervisorError("tally is not up (supervisord is not running): `tally up`")
    now = now or datetime.now(UTC)
    crashes = restarts(main_log(cfg).read_text(errors="replace")
                       if main_log(cfg).exists() else "")
    out = []
    with rpc(cfg) as server:
        infos = server.getAllProcessInfo()
    for info in infos:
        name = info["name"]
        started = info["start"] if info["pid"] else 0
        out.append({
            "name": name, "state": info["statename"], "pid": info["pid"] or None,
            "uptime_s": int(now.timestamp() - started) if started else None,
            "restarts": len(crashes.get(name, [])),
            "last_exit": crashes[name][-1] if crashes.get(name) else None,
        })
    return sorted(out, key=lambda d: d["name"])


def restarts(log: str) -> dict[str, list[str]]:
    """Unexpected exits per program since supervisord last started, from its log
    (`... WARN exited: placer (terminated by SIGKILL; not expected)`): each one it
    restarted."""
    out: dict[str, list[str]] = {}
    for line in log.splitlines():
        if "supervisord started with pid" in line:
            out = {}
        _, found, rest = line.partition(" exited: ")
        if found and rest.endswith("; not expected)"):
            name, _, how = rest.partition(" (")
            out.setdefault(name, []).append(how.removesuffix("; not expected)"))
    return out


def _wait(done: Any, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise SupervisorError(message)
        time.sleep(0.1)


def base_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The TALLY_* settings to hand on to every daemon (and PATH, HOME, LANG)."""
    env = dict(os.environ if env is None else env)
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH")
    return {k: v for k, v in env.items() if k.startswith("TALLY_") or k in keep}
