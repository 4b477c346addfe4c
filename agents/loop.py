"""The follower loop every controller here runs: act, then sleep until a relay says the
ledger moved or the timer rings, whichever comes first. A lost wake-up only delays."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from ledger import LedgerUnavailable
from ledger.subscriber import Subscriber


def every_wakeup(step: Callable[[], object], stop: threading.Event, relays: Sequence[str],
                 interval: float, log: logging.Logger) -> None:
    """Call `step` after each wake-up and every `interval` seconds until `stop` is set;
    an unavailable ledger is waited out, never fatal."""
    sub = Subscriber(relays) if relays else None
    try:
        while not stop.is_set():
            try:
                step()
            except LedgerUnavailable as exc:
                log.warning("ledger unavailable, retrying: %s", exc)
            if sub is not None:
                sub.wait(interval)
            else:
                stop.wait(interval)
    finally:
        if sub is not None:
            sub.close()
