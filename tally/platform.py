"""What `tally up` runs on one machine: each daemon's name, `tally` arguments, and where
a person reaches it. Each part adds its daemons here."""

from __future__ import annotations

from tally.config import Config


def daemons(cfg: Config) -> list[tuple[str, list[str], str]]:
    out = [
        (f"relay-{i}", ["serve", "relay", "--endpoint", endpoint], endpoint)
        for i, endpoint in enumerate(cfg.relays, start=1)
    ]
    out.append(("projectors", ["serve", "projectors"],
                "views in the ledger database (tally projectors status)"))
    out.append(("api", ["serve", "api", "--bind", cfg.api_bind], f"http://{cfg.api_bind}"))
    return out
