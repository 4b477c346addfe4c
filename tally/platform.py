"""What `tally up` runs on one machine: each daemon's name, `tally` arguments, and where
a person reaches it. Each part adds its daemons here."""

from __future__ import annotations

import time
import urllib.request

from tally.config import Config


def daemons(cfg: Config) -> list[tuple[str, list[str], str]]:
    out = [
        (f"relay-{i}", ["serve", "relay", "--endpoint", endpoint], endpoint)
        for i, endpoint in enumerate(cfg.relays, start=1)
    ]
    out.append(("projectors", ["serve", "projectors"],
                "views in the ledger database (tally projectors status)"))
    out.append(("api", ["serve", "api", "--bind", cfg.api_bind], f"http://{cfg.api_bind}"))
    out.append(("collector", ["serve", "collector"], f"{cfg.collector} -> {cfg.app_logs_dir}"))
    out.append(("placer", ["serve", "placer"], "places instances (its decisions: tally events)"))
    for i, ports in enumerate(cfg.agent_ports, start=1):
        out.append((f"agent-{i}", ["serve", "agent", "--host-id", f"h{i}", "--port-range",
                                   ports, "--stop-apps-on-exit"],
                    f"host h{i}, app ports {ports}"))
    return out


def wait_ready(cfg: Config, timeout: float = 60.0) -> None:
    """Until the API answers /healthz, so `tally up` returns a platform one can use."""
    deadline = time.monotonic() + timeout
    url = f"http://{cfg.api_bind}/healthz"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise OSError(f"the API did not answer {url} within {timeout:.0f}s: "
                          f"see {cfg.log_dir / 'api.log'}")
        time.sleep(0.2)
