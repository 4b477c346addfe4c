"""The systemd units a production host runs tally's daemons with (`tally systemd-units`):
one service per daemon of the table in tally/platform.py, all part of `tally.target`.

systemd restarts a daemon that dies (Restart=always, with a delay growing to a minute),
gives up on a crash loop only for the burst window, sends journald its output (rotated
there), and stops the whole target with `systemctl stop tally.target`. Settings come from
one environment file, never from a command line (`ps` shows command lines to everyone).
"""

from __future__ import annotations

import shlex

from tally.supervise import STOP_WAIT_SECS, Program

ENV_FILE = "/etc/tally/tally.env"
"""TALLY_* settings and secrets (0600, root): the agents' tokens go here too."""


def units(programs: list[Program], user: str = "root") -> dict[str, str]:
    """File name -> content, `tally.target` first."""
    out = {"tally.target": "\n".join([
        "[Unit]", "Description=tally, every daemon of this host",
        "Wants=" + " ".join(f"tally-{p.name}.service" for p in programs),
        "", "[Install]", "WantedBy=multi-user.target", ""])}
    for p in programs:
        env = [f"Environment={shlex.quote(f'{k}={v}')}" for k, v in sorted(p.env.items())
               if not k.endswith("_TOKEN")]
        secret = [f"# {k}: put it in {ENV_FILE}" for k in sorted(p.env) if k.endswith("_TOKEN")]
        out[f"tally-{p.name}.service"] = "\n".join([
            "[Unit]", f"Description=tally {p.name}", "PartOf=tally.target",
            "After=network-online.target", "Wants=network-online.target",
            "StartLimitIntervalSec=300", "StartLimitBurst=20", "",
            "[Service]", "Type=simple", f"User={user}", f"EnvironmentFile={ENV_FILE}",
            *env, *secret, f"ExecStart={shlex.join(p.command())}", "Restart=always",
            "RestartSec=1", "RestartSteps=6", "RestartMaxDelaySec=60",
            "KillSignal=SIGTERM", f"TimeoutStopSec={STOP_WAIT_SECS}", "KillMode=mixed",
            "", "[Install]", "WantedBy=tally.target", ""])
    return out


def render(programs: list[Program], user: str = "root") -> str:
    """Every unit, each under a `# /etc/systemd/system/<name>` header."""
    return "\n".join(f"# /etc/systemd/system/{name}\n{text}"
                     for name, text in units(programs, user).items())
