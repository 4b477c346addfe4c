"""Is an instance up? Heroku's rule by default: a web instance is up once its port accepts
connections. An app may ask for an HTTP check in its config: TALLY_HEALTHCHECK_PATH (e.g.
/healthz), TALLY_HEALTHCHECK_STATUS (codes or classes, default `2xx,3xx`),
TALLY_HEALTHCHECK_TIMEOUT (seconds, default the agent's). Every verdict says what happened
in words a person reads in `tally ps`, `why` and the instance's log: "answered 500 on /",
"no answer within 1 s", "port 7000 not bound".
"""

from __future__ import annotations

import http.client
import socket
from dataclasses import dataclass


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
        return cls(min(max(timeout, 0.1), 60.0), path, statuses)

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
    conn = http.client.HTTPConnection(address, port, timeout=check.timeout)
    try:
        conn.request("GET", check.path, headers={"User-Agent": "tally-health"})
        status = conn.getresponse().status
    except TimeoutError:
        return Verdict(False, f"no answer within {check.timeout:g} s on {check.path}", True)
    except ConnectionRefusedError:
        return Verdict(False, f"port {port} not bound")
    except (OSError, http.client.HTTPException) as exc:
        return Verdict(False, f"no HTTP answer on {check.path}: {exc}", True)
    finally:
        conn.close()
    if check.expects(status):
        return Verdict(True, "", True)
    return Verdict(False, f"answered {status} on {check.path}", True)
