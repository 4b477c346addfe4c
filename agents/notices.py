"""The platform's own lines in an app's log, from a daemon that runs no instance of it.

The add-on databases' watcher (agents/dbsize.py) tells the app that its database went
read-only where the app's people look, `tally logs`, as the agents' R14/R15 lines are: one
message to the collector, as the control plane (its CURVE key is the balancers'), under
the log name `<app>.<source>` (`blog.addon.postgresql`), the line tagged as the agents'
(agents/logpipe.py: MARK), so it shows as `tally[blog.addon.postgresql] ...`, a line no
app can write.

Each notice is its own epoch (the time in ns) from offset 0: the collector writes it
once, whatever else this sender sent before, and a notice sent again is not written twice.
"""

from __future__ import annotations

import time

import zmq

from agents import logpipe
from ledger import curve


def send(endpoint: str, client: curve.Client | None, app: str, source: str, text: str,
         timeout_s: float = 5.0, context: zmq.Context | None = None) -> bool:
    """Write `text` as the platform's line in the app's log; whether the collector
    acknowledged it within `timeout_s`."""
    context = context or zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if client is not None:
            curve.as_client(sock, client)
        sock.connect(endpoint)
        data = logpipe.MARK + logpipe.clean(text).encode() + b"\n"
        sock.send_multipart([app.encode(), f"{app}.{source}".encode(),
                             b"%d" % time.time_ns(), b"0", data])
        return bool(sock.poll(int(timeout_s * 1000)))
    finally:
        sock.close()
