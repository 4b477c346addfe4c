"""`tally up` and `tally down` as `make up` runs them, on private ports and a private home:
the ledger under Patroni and etcd, every daemon under supervisord, the API answers, a daemon
killed with -9 comes back and `tally status` counts its restart (etcd and the leader's
Patroni included: the ledger takes writes again), a second `up` changes nothing, `down`
stops all."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import requests

from ledger.cluster import pid_alive
from tally import supervise
from tally.config import Config
from tests.certs import self_signed, tls_get
from tests.conftest import listening_ports, remove_home, up_env
from tests.waiting import wait_until

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "apps"


def test_up_then_down() -> None:
    home = Path(tempfile.mkdtemp(prefix="tally-up-"))
    home.chmod(0o755)
    env = up_env(home)
    cfg = Config.from_env(env)
    web, tls = listening_ports(cfg.balancers), listening_ports(cfg.balancers_tls)

    def tally(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tally.cli", *args], env=env,
                              capture_output=True, text=True, timeout=180)
    try:
        first = tally("up")
        assert first.returncode == 0, first.stderr
        # Every daemon running (one that started before what it needs was up may have been
        # restarted once already: that is what the supervisor is for).
        def all_running() -> dict | None:
            daemons = {d["name"]: d for d in supervise.status(cfg)}
            return daemons if all(d["state"] == "RUNNING" for d in daemons.values()) else None

        running = wait_until(all_running, 60, "every daemon RUNNING")
        names = sorted(running)
        assert {"relay-1", "relay-2", "projectors", "api", "placer", "builder", "agent-1",
                "agent-2", "collector", "balancer-1", "balancer-2", "ledger-etcd",
                "ledger-patroni-a", "ledger-patroni-b", "backups"} <= set(names)
        assert "first admin" in first.stdout
        assert requests.get(f"http://{cfg.api_bind}/healthz", timeout=10).ok
        token_file = home / "secrets" / "agent-h1.token"
        assert token_file.stat().st_mode & 0o777 == 0o600

        # The platform as a developer meets it: deploy the sample app; the agents fetch the
        # bundle through the API with their own tokens.
        # A name of this run's own: other tests' agents on this machine may still run a
        # `hello` as user tally-hello with another platform's uid.
        app = f"hello-{uuid.uuid4().hex[:6]}"
        assert tally("apps:create", app).returncode == 0
        deploy = tally("deploy", "--app", app, str(FIXTURES / "hello"))
        assert deploy.returncode == 0, deploy.stderr
        assert "healthy" in tally("ps", "--app", app).stdout
        url = f"http://{app}.localhost:{web[0]}/"
        assert f"{app} answers at {url}" in deploy.stdout
        assert f"web_url:      {url}" in tally("apps:info", app).stdout
        for port in web:  # both balancers route the app's platform name to it
            wait_until(lambda port=port: requests.get(
                f"http://127.0.0.1:{port}/", headers={"Host": f"{app}.localhost"},
                timeout=10).status_code == 200, 10, f"balancer on {port} never routed {app}")
        # HTTPS: the app's own certificate (tally certs:add, its key sealed with tally up's
        # seal key) served by both balancers' TLS listeners, chosen by SNI.
        cert, key = self_signed([f"{app}.localhost"])
        (home / "app.crt").write_text(cert)
        (home / "app.key").write_text(key)
        added = tally("certs:add", "-a", app, "--cert", str(home / "app.crt"), "--key",
                      str(home / "app.key"))
        assert added.returncode == 0, added.stderr
        der = ssl.PEM_cert_to_DER_cert(cert)

        def https(port: int) -> bool:
            try:
                got, reply = tls_get(port, f"{app}.localhost")
            except OSError:
                return False
            return got == der and reply.startswith(b"HTTP/1.1 200 ")
        for port in tls:
            wait_until(lambda port=port: https(port), 30, f"no HTTPS for {app} on {port}")
        # One-offs go to the host that runs the app: an agent is given (through the API)
        # only bundles of releases placed on it. Three runs: the other host, picked by
        # chance, would refuse at least one of them 7 times out of 8.
        for _ in range(3):
            run = tally("run", "-a", app, "--", "python", "-c", "print('one-off')")
            assert run.returncode == 0 and "one-off" in run.stdout, run.stderr

        # A crashed daemon comes back, and `tally status` says it was restarted.
        before = next(d for d in supervise.status(cfg) if d["name"] == "placer")
        placer = before["pid"]
        os.kill(placer, signal.SIGKILL)
        back = wait_until(lambda: next((d for d in supervise.status(cfg)
                                        if d["name"] == "placer" and d["state"] == "RUNNING"
                                        and d["pid"] not in (None, placer)), None),
                          60, "placer not restarted")
        assert back["restarts"] == before["restarts"] + 1 and "SIGKILL" in back["last_exit"]
        shown = tally("status")
        assert shown.returncode == 0, shown.stderr
        (line,) = [x for x in shown.stdout.splitlines() if x.startswith("placer ")]
        assert line.split()[1:3] == ["RUNNING", str(back["pid"])]
        assert f" {back['restarts']} " in line
        assert (cfg.log_dir / "placer.log").exists()

        # The ledger's etcd and its leader's Patroni, killed -9, come back by themselves, and
        # the ledger takes writes again (through the API) with its synchronous standby.
        leader = cfg.cluster().primary()
        killed = {name: pid for name, pid in ((d["name"], d["pid"])
                                              for d in supervise.status(cfg))
                  if name in ("ledger-etcd", f"ledger-patroni-{leader}")}
        for pid in killed.values():
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: all(d["state"] == "RUNNING" and d["pid"] != killed[d["name"]]
                               for d in supervise.status(cfg) if d["name"] in killed),
                   60, "etcd or Patroni not restarted")

        def ledger_healthy() -> bool:
            try:
                roles = {m["role"]: m["state"] for m in cfg.cluster().state()["members"]}
            except Exception:  # noqa: BLE001 (Patroni's REST API restarting)
                return False
            return roles == {"leader": "running", "sync_standby": "streaming"}
        wait_until(ledger_healthy, 120, "the ledger never had a leader and sync standby again")
        wait_until(lambda: tally("apps:create", f"back-{uuid.uuid4().hex[:6]}").returncode == 0,
                   60, "no write through the API after etcd and Patroni were killed")
        refused = tally("ledger", "stop")  # supervisord would only start it again
        assert refused.returncode == 1 and "tally down" in refused.stderr, refused.stderr

        pids = {d["name"]: d["pid"] for d in supervise.status(cfg)}
        again = tally("up")
        assert again.returncode == 0 and "first admin" not in again.stdout
        assert {d["name"]: d["pid"] for d in supervise.status(cfg)} == pids
        down = tally("down")
        assert down.returncode == 0, down.stderr
        assert not any(pid_alive(p) for p in pids.values() if p)
        assert not supervise.running(cfg) and tally("status").returncode == 1
        assert {n.role for n in cfg.cluster().status()} == {"stopped"}
    finally:
        tally("down")
        remove_home(home)
