"""Agent users and tokens for simulated hosts (`tally sim`, bench/fleet.py), issued the
operator's way, as `tally admin create-user` does."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from ledger import Ledger, NewEvent
from tally.config import Config


def issue_tokens(ledger: Ledger, host_ids: Sequence[str], prefix: str = "sim") -> dict[str, str]:
    """An agent user `<prefix>-<host>` with a token per simulated host, appended a thousand
    users per transaction (the operator's path, as `tally admin create-user` is)."""
    from api.auth import user_events
    from ledger.batch import Item, append_streams

    tokens: dict[str, str] = {}
    meta = {"actor": "tally sim", "role": "operator"}
    for i in range(0, len(host_ids), 1000):
        items = []
        for host in host_ids[i:i + 1000]:
            token, events = user_events(f"{prefix}-{host}", "agent", host, label="tally sim")
            tokens[host] = token
            items += [Item(f"user-{prefix}-{host}", NewEvent(e.type, e.data, meta),
                           f"sim-{os.urandom(8).hex()}") for e in events]
        append_streams(ledger, items)
    return tokens


def saved_tokens(cfg: Config, ledger: Ledger, host_ids: Sequence[str]) -> dict[str, str]:
    """Tokens kept in $TALLY_HOME/secrets/sim-tokens.json (0600); missing ones issued."""
    path = cfg.home / "secrets" / "sim-tokens.json"
    known: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [h for h in host_ids if h not in known]
    if missing:
        known.update(issue_tokens(ledger, missing))
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps(known))
    return {h: known[h] for h in host_ids}


def host_ids(n: int, prefix: str = "sim") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]
