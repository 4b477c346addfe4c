"""With an agent token, the host agent downloads bundles through the API (which serves a
release only to agents of hosts it is placed on), checks the digest, and runs it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agents.bundle import BundleRefused, download
from api.auth import create_user
from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from tests.conftest import free_port_range, free_ports
from tests.fixtures.apps import app_tarball, slug_for
from tests.fixtures.apps.fleet import AgentProc, Daemon, create_app, release
from tests.waiting import wait_until


def test_the_agent_fetches_its_slug_from_the_api(private: Cluster, tmp_path: Path) -> None:
    api_port, (low, _) = free_ports(1)[0], free_port_range(3)
    api = f"http://127.0.0.1:{api_port}"
    daemons = [Daemon(private, "api", ["api", "--bind", f"127.0.0.1:{api_port}",
                                       "--workers", "1"]),
               Daemon(private, "projectors", ["projectors"])]
    with Ledger(private.dsn()) as ledger:
        token = create_user(ledger, "agent-hx", "agent", "hx")
        create_app(ledger, "fetched", {"GREETING": "over http"})
        release(ledger, private.root.parent, "fetched", "hello", 1, config_version=1)
        digest, _ = slug_for(app_tarball("hello"), private.root.parent / "bundles")
        agent = AgentProc(private, "hx", (low, low + 2), env={
            "TALLY_AGENT_TOKEN": token, "TALLY_AGENT_API": api})
        for d in [*daemons, agent]:
            d.start()
        try:
            wait_until(lambda: _up(api), 30, "the API up")
            with pytest.raises(BundleRefused, match="403"):  # not placed on hx yet
                download(api, token, "fetched", 1, digest, tmp_path, patience=0.5, kind="slug")
            ledger.append("placement-fetched", [NewEvent("InstancePlaced", {
                "instance_id": "fetched.1.web.f1", "app": "fetched", "release": 1,
                "process_type": "web", "host_id": "hx", "port": low})])

            def answer() -> dict | None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{low}/", timeout=2) as r:
                        return json.loads(r.read())
                except OSError:
                    return None

            assert wait_until(answer, 60, "the instance answering")["greeting"] == "over http"
            assert (agent.home / "agents" / "hx" / "bundles" / f"{digest}.tar.gz").exists()
        finally:
            for d in [agent, *daemons]:
                d.kill()
            agent.kill_apps()


def _up(api: str) -> bool:
    try:
        urllib.request.urlopen(f"{api}/me", timeout=1)
    except urllib.error.HTTPError:
        return True  # 401: it answers
    except OSError:
        return False
    return True
