"""Run tickets: the API's short-lived, single-use permission for one host agent to run (or
stop) one command of one app for one caller.

HMAC-SHA256 over the ticket's JSON with the key of the host it is for. Only the API holds
the platform's run key (`TALLY_RUN_KEY`; `tally up` keeps it 0600 in $TALLY_HOME/secrets);
each host's key is derived from it (`host_key`) and handed to that host's agent when it
registers, in the answer to its host-scoped token. An agent knows its own key only, so a
host taken over can sign tickets for itself and no other. Signed rather than checked back
with the API: an agent verifies a ticket with no round trip and keeps working while the
API restarts; what it cannot know alone (has this ticket been used?) it remembers itself
(`Redeemed`). Here, in the lowest package both the API (which signs) and the agents
(which verify) import, so the format lives once. Pure: no I/O, the clock passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

TTL_S = 30.0
"""A ticket is good for this long after it is signed: enough to reach the agent."""
KEY_BYTES = 32


class TicketRefused(Exception):
    """The ticket is not one this agent may act on; the message says why."""


@dataclass(frozen=True)
class Ticket:
    """What the bearer may do: `kind` "run" (start `argv` of `app`'s `release`) or "stop"
    (end run `number`), on `host`, for `actor`, until `expires`."""

    kind: str
    run_id: str
    app: str
    number: int
    release: int
    argv: tuple[str, ...]
    actor: str
    host: str
    issued: float
    expires: float
    detached: bool = False
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["argv"] = list(self.argv)
        return d


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def parse_key(text: str) -> bytes:
    """The key from its hex form (TALLY_RUN_KEY); ValueError if it is not one."""
    key = bytes.fromhex(text.strip())
    if len(key) < 16:
        raise ValueError("TALLY_RUN_KEY must be at least 16 bytes of hex")
    return key


def host_key(master: bytes, host: str) -> bytes:
    """The key of `host`'s tickets: a PRF of the platform's key and the host's name, so the
    API needs to store nothing per host and a host's key says nothing of another's."""
    return hmac.new(master, b"tally run tickets\x00" + host.encode(), hashlib.sha256).digest()


def channel_seed(master: bytes) -> bytes:
    """The seed of the API's CURVE keypair on the run channel (ledger/curve.py from_seed):
    every API process derives the same one; agents admit only its public key."""
    return hmac.new(master, b"tally run channel\x00curve", hashlib.sha256).digest()


def sign(key: bytes, ticket: Ticket) -> str:
    body = base64.urlsafe_b64encode(json.dumps(ticket.as_dict(), sort_keys=True,
                                               separators=(",", ":")).encode()).decode()
    mac = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
    return f"{body}.{mac}"


def verify(key: bytes, text: str, host: str, now: float) -> Ticket:
    """The ticket, if signed with `key`, for `host`, and not expired; else TicketRefused.
    Single use is the caller's to check (`Redeemed`)."""
    body, _, mac = text.rpartition(".")
    good = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
    if not body or not hmac.compare_digest(good, mac):
        raise TicketRefused("bad ticket signature: runs are started through the API")
    try:
        d = json.loads(base64.urlsafe_b64decode(body.encode()))
        ticket = Ticket(**{**d, "argv": tuple(str(a) for a in d["argv"])})
    except (ValueError, TypeError, KeyError) as exc:
        raise TicketRefused("malformed ticket") from exc
    if ticket.host != host:
        raise TicketRefused(f"ticket is for host {ticket.host}, not this one ({host})")
    if now > ticket.expires:
        raise TicketRefused("expired ticket: ask the API for a new run")
    return ticket


class Redeemed:
    """The tickets an agent has used, until they expire: a replay is refused. Tickets
    issued before `since` (the agent's start) are refused too, so a restart, which forgets
    this set, reopens nothing. A run's tickets are all issued at the run's start and share
    its nonce (api/runs.py), so however often it is attached, it starts at most once."""

    def __init__(self, since: float) -> None:
        self.since = since
        self.used: dict[str, float] = {}

    def redeem(self, ticket: Ticket, now: float) -> None:
        self.used = {n: exp for n, exp in self.used.items() if exp >= now}
        if ticket.issued < self.since:
            raise TicketRefused("ticket from before this agent started: ask the API again")
        if ticket.nonce in self.used:
            raise TicketRefused("ticket already used")
        self.used[ticket.nonce] = ticket.expires


KEEPALIVE_S = 1.0
"""The run channel's timings, shared by the agent, the API that relays and the CLI: while a
run prepares (maybe a pip install) or runs, each side says "alive" this often..."""
SILENCE_S = 10.0
"""...and gives up on a peer it has not heard from for this long (the agent hangs up the
command with SIGHUP, the CLI exits 1 saying so)."""
RELAYS_FULL = ("the API is relaying as many attached runs as it may: try again shortly, or "
               "use `tally run:detached`")
"""Why an API process refuses an attach (503) when it relays its `run_slots` runs already:
the API records it as the run's end, and the CLI says it without asking again."""
