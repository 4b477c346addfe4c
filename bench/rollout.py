"""How long a release takes to serve, timed the same way by every benchmark that deploys
(bench/agents.py, bench/builds.py): from its ReleaseCreated until one of its instances
answers 200 with its number, watched through the placer's own fold of the ledger."""

from __future__ import annotations

import json
import time
import urllib.request

from agents.fleet import Fleet
from agents.placer import catch_up
from ledger import Ledger
from tests.waiting import wait_until


def first_200(port: int, release_no: int | None, deadline: float) -> bool:
    """Whether the app on `port` answers 200 (saying it is `release_no`, when given)
    before `deadline` (monotonic)."""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                body = json.loads(r.read())
                if r.status == 200 and (release_no is None or body["release"] == str(release_no)):
                    return True
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    return False


def fleet_now(ledger: Ledger) -> Fleet:
    """The fleet as the placer sees it now."""
    fleet = Fleet()
    catch_up(ledger, fleet)
    return fleet


def time_to_serve(ledger: Ledger, app: str, release_no: int, since: float,
                  placed_within: float = 60) -> float:
    """Seconds from `since` (monotonic, taken before the release was appended) until an
    instance of the release answers 200; then waits, untimed, until the older release's
    instances are withdrawn, so the next deploy starts from one release."""
    placed = wait_until(lambda: next((p for p in fleet_now(ledger).placements_of(app)
                                      if p.release == release_no), None),
                        placed_within, f"v{release_no} placed", interval=0.01)
    assert first_200(placed.port, release_no, time.monotonic() + 120), (
        f"v{release_no} never answered")
    took = time.monotonic() - since
    wait_until(lambda: all(p.release == release_no
                           for p in fleet_now(ledger).placements_of(app)),
               60, "the old release withdrawn", interval=0.01)
    return took
