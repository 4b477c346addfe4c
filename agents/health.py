"""Is an instance up? Heroku's rule by default: a web instance is up once its port accepts
connections. An app may ask for an HTTP check in its config: TALLY_HEALTHCHECK_PATH (e.g.
/healthz), TALLY_HEALTHCHECK_STATUS (codes or classes, default `2xx,3xx`),
TALLY_HEALTHCHECK_TIMEOUT (seconds, default the agent's, at most MAX_TIMEOUT). Every verdict
says what happened in words a person reads in `tally ps`, `why` and the instance's log:
"answered 500 on /", "no answer within 1 s", "port 7000 not bound".
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass

MAX_TIMEOUT = 5.0
"""An app's check may wait this long at most: checks hold the agent's round (and so its
heartbeat, whose TTL is 15 s), and the app chooses how slowly to answer."""
MAX_HEAD = 8192
"""Bytes read for the status line; an app that sends more without one has not answered."""
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})[ \r]")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str = ""
    answered: bool = False
    """An HTTP request reached the app (it counts it as served)."""


@dataclass(frozen=True)
class Check:
    timeout: float
    path: str = ""
    """Empty: the port accepting a connection is enough."""
    statuses: tuple[str, ...] = ("2xx", "3xx")

    @classmethod
    def from_config(cls, config: dict[str, str], default_timeout: float) -> Check:
        """The app's own check from its config vars; a malformed one falls back to the
        default rather than killing a healthy app."""
        try:
            timeout = float(config.get("TALLY_HEALTHCHECK_TIMEOUT", default_timeout))
        except ValueError:
            timeout = default_timeout
        path = config.get("TALLY_HEALTHCHECK_PATH", "").strip()
        if path and not path.startswith("/"):
            path = "/" + path
        statuses = tuple(s.strip().lower() for s in
                         config.get("TALLY_HEALTHCHECK_STATUS", "2xx,3xx").split(",")
                         if s.strip()) or ("2xx", "3xx")
        return cls(min(max(timeout, 0.1), MAX_TIMEOUT), path, statuses)

    def expects(self, status: int) -> bool:
        code = str(status)
        return any(s == code or (len(s) == 3 and s.endswith("xx") and s[0] == code[0])
                   for s in self.statuses)


def probe(address: str, port: int, check: Check) -> Verdict:
    """One check of the instance at address:port."""
    if not check.path:
        try:
            with socket.create_connection((address, port), timeout=check.timeout):
                return Verdict(True)
        except TimeoutError:
            return Verdict(False, f"no answer within {check.timeout:g} s")
        except OSError:
            return Verdict(False, f"port {port} not bound")
    try:
        status = _status(address, port, check)
    except TimeoutError:
        return Verdict(False, f"no answer within {check.timeout:g} s on {check.path}", True)
    except ConnectionRefusedError:
        return Verdict(False, f"port {port} not bound")
    except (OSError, ValueError) as exc:
        return Verdict(False, f"no HTTP answer on {check.path}: {exc}", True)
    if check.expects(status):
        return Verdict(True, "", True)
    return Verdict(False, f"answered {status} on {check.path}", True)


def _status(address: str, port: int, check: Check) -> int:
    """The status of `GET path`, read within one deadline for the whole exchange: a
    per-read timeout would let an app that sends a byte at a time hold the check forever."""
    deadline = time.monotonic() + check.timeout
    request = (f"GET {check.path} HTTP/1.1\r\nHost: {address}:{port}\r\n"
               "User-Agent: tally-health\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((address, port), timeout=check.timeout) as sock:
        sock.sendall(request)
        head = b""
        while b"\n" not in head:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(MAX_HEAD - len(head))
            if not chunk:
                raise ValueError("the connection closed before a status line")
            head += chunk
            if len(head) >= MAX_HEAD:
                break
    found = STATUS_LINE.match(head)
    if found is None:
        first = head.split(b"\n")[0][:60]
        raise ValueError(f"not an HTTP status line: {first!r}")
    return int(found.group(1))
