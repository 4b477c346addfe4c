"""Automatic certificates over ACME (RFC 8555, Let's Encrypt's protocol) for apps' domains,
renewed before they expire: `tally serve acme`, a control-plane daemon beside the ledger.

The decisions are a fold of the ledger (`Book`: each app's exact domains, the certificates
recorded for them, the last failure per hostname) and one plain function (`Book.due`): a
domain with no certificate, or whose best certificate ends within `renew_before`, is
ordered, unless its last order failed less than `retry_after` ago. Wildcard domains are
left alone (HTTP-01 cannot prove them) and so are platform names (`<app>.<suffix>`: the
operator's wildcard certificate covers those).

Each order is a story in the app's stream: CertificateRequested (the HTTP-01 challenges,
which the routes view hands to every balancer: they answer
`/.well-known/acme-challenge/TOKEN` themselves), then CertificateIssued, or
CertificateRenewed naming the certificate it replaces, or CertificateFailed with the CA's
reason. Before telling the CA to validate, the agent checks that the balancers it was told
of already answer the challenge (as certbot's self-check does), so the CA never races the
routes. The certificate's key is made here and sealed (ledger/tls.py) before it is
recorded. The ACME account key is kept 0600 in TALLY_HOME/secrets.
"""

from __future__ import annotations

import http.client
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ledger import Ledger, NewEvent
from ledger.errors import LedgerError
from ledger.events import RecordedEvent
from ledger.tls import CertificateRefused, check_certificate, covers, seal

log = logging.getLogger("tally.acme")

FOLDED = ["AppCreated", "AppDeleted", "DomainAdded", "DomainRemoved", "CertificateAdded",
          "CertificateIssued", "CertificateRenewed", "CertificateRemoved", "CertificateFailed"]
"""The event types the agent's fold reads."""
CHALLENGE_PATH = "/.well-known/acme-challenge/"


@dataclass(frozen=True)
class Held:
    """A certificate an app has."""

    cert_id: str
    app: str
    hostnames: tuple[str, ...]
    not_after: datetime


@dataclass(frozen=True)
class Due:
    """A hostname to order a certificate for, and the certificate the new one replaces."""

    app: str
    hostname: str
    renews: str | None


@dataclass
class Book:
    """What the ledger says, as of `position`."""

    domains: dict[str, set[str]] = field(default_factory=dict)
    certs: dict[str, Held] = field(default_factory=dict)
    failed: dict[str, datetime] = field(default_factory=dict)
    position: int = 0

    def apply(self, events: Iterable[RecordedEvent]) -> None:
        for e in events:
            d = e.data
            if e.type == "AppCreated":
                self.domains[d["name"]] = set()
            elif e.type == "AppDeleted":
                self.domains.pop(d["name"], None)
                self.certs = {k: c for k, c in self.certs.items() if c.app != d["name"]}
            elif e.type in ("DomainAdded", "DomainRemoved"):
                names = self.domains.setdefault(d["app"], set())
                if e.type == "DomainRemoved":
                    names.discard(d["domain"])
                elif not d["domain"].startswith("*."):
                    names.add(d["domain"])
            elif e.type == "CertificateRemoved":
                self.certs.pop(d["cert_id"], None)
            elif e.type == "CertificateFailed":
                for name in d["hostnames"]:
                    self.failed[name] = e.recorded_at or datetime.now(UTC)
            elif e.type in ("CertificateAdded", "CertificateIssued", "CertificateRenewed"):
                self.certs.pop(d.get("renews", ""), None)
                self.certs[d["cert_id"]] = Held(d["cert_id"], d["app"], tuple(d["hostnames"]),
                                                datetime.fromisoformat(d["not_after"]))
                for name in d["hostnames"]:
                    self.failed.pop(name, None)
            if e.position:
                self.position = max(self.position, e.position)

    def best(self, app: str, hostname: str) -> Held | None:
        """The app's certificate for `hostname` that is valid longest."""
        fits = [c for c in self.certs.values()
                if c.app == app and any(covers(n, hostname) for n in c.hostnames)]
        return max(fits, key=lambda c: c.not_after, default=None)

    def due(self, now: datetime, renew_before: timedelta,
            retry_after: timedelta) -> list[Due]:
        out = []
        for app, names in sorted(self.domains.items()):
            for hostname in sorted(names):
                held = self.best(app, hostname)
                if held is not None and held.not_after - now > renew_before:
                    continue
                failed = self.failed.get(hostname)
                if failed is not None and now - failed < retry_after:
                    continue
                # Renewed replaces the old one only when it named exactly this hostname.
                renews = held.cert_id if held and held.hostnames == (hostname,) else None
                out.append(Due(app, hostname, renews))
        return out


class AcmeFailed(Exception):
    """An order did not end in a certificate (the CA's or the self-check's reason)."""


@dataclass(frozen=True)
class Settings:
    directory: str
    """The ACME directory URL (Let's Encrypt's, or pebble's in tests)."""
    account_key: Path
    seal_key: str
    ca_bundle: str | None = None
    """Trust this CA file for the directory's HTTPS (pebble's test certificate)."""
    balancers: tuple[str, ...] = ()
    """HOST:PORT of balancers whose answer to each challenge is checked first."""
    renew_before: timedelta = timedelta(days=30)
    retry_after: timedelta = timedelta(minutes=10)
    every: float = 60.0
    order_timeout: float = 90.0


class AcmeAgent:
    """The shell: reads the ledger, orders what is due, appends what happened."""

    def __init__(self, ledger: Ledger, settings: Settings,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.ledger, self.s, self.now = ledger, settings, now
        self.book = Book()
        self._client: Any = None

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except LedgerError as exc:
                log.warning("ledger unavailable: %s", exc)
            stop.wait(self.s.every)

    def tick(self) -> list[str]:
        """One pass: catch up with the ledger, order each due hostname; what happened."""
        self.ledger.sequence()
        while batch := self.ledger.read_all(self.book.position, limit=5000, types=FOLDED):
            self.book.apply(batch)
        done = []
        for due in self.book.due(self.now(), self.s.renew_before, self.s.retry_after):
            done.append(self.order(due))
        return done

    def order(self, due: Due) -> str:
        """One order for one hostname, recorded whichever way it ends."""
        try:
            events = self._order(due)
        except Exception as exc:  # the CA's errors, timeouts, a refused certificate
            reason = f"{type(exc).__name__}: {exc}"[:2000]
            log.warning("certificate for %s failed: %s", due.hostname, reason)
            events = [NewEvent("CertificateFailed", {"app": due.app, "hostnames": [due.hostname],
                                                     "error": reason})]
        self._append(due.app, events)
        return f"{events[-1].type} {due.hostname}"

    def _append(self, app: str, events: list[NewEvent]) -> None:
        stamped = [NewEvent(e.type, e.data, {"actor": "acme", "role": "operator"})
                   for e in events]
        self.ledger.append(f"app-{app}", stamped)
        while batch := self.ledger.read_all(self.book.position, limit=5000, types=FOLDED):
            self.book.apply(batch)  # what was just recorded (when sequenced already)

    def _order(self, due: Due) -> list[NewEvent]:
        from acme import challenges, crypto_util
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        client = self._acme()
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        order = client.new_order(crypto_util.make_csr(key_pem, [due.hostname]))
        answers = []
        published: dict[str, dict[str, str]] = {}
        for authz in order.authorizations:
            challb = next((c for c in authz.body.challenges
                           if isinstance(c.chall, challenges.HTTP01)), None)
            if challb is None:
                raise AcmeFailed(f"the CA offers no HTTP-01 challenge for {due.hostname}")
            response, validation = challb.response_and_validation(client.net.key)
            token = challb.chall.encode("token")
            published[token] = {"hostname": authz.body.identifier.value,
                                "key_authorization": validation}
            answers.append((challb, response))
        self._append(due.app, [NewEvent("CertificateRequested", {
            "app": due.app, "hostnames": [due.hostname], "challenges": published})])
        for token, c in published.items():
            self._self_check(c["hostname"], token, c["key_authorization"])
        for challb, response in answers:
            client.answer_challenge(challb, response)
        deadline = datetime.now() + timedelta(seconds=self.s.order_timeout)
        finished = client.poll_and_finalize(order, deadline=deadline)
        try:
            cert = check_certificate(finished.fullchain_pem, key_pem.decode())
        except CertificateRefused as exc:
            raise AcmeFailed(f"the CA's certificate is unusable: {exc}") from None
        data = {"app": due.app, "cert_id": cert.cert_id, "hostnames": list(cert.hostnames),
                "not_after": cert.not_after.isoformat(), "cert_pem": cert.cert_pem,
                "key_sealed": seal(self.s.seal_key, cert.key_pem)}
        if due.renews is not None:
            return [NewEvent("CertificateRenewed", {**data, "renews": due.renews})]
        return [NewEvent("CertificateIssued", data)]

    def _self_check(self, hostname: str, token: str, expected: str,
                    patience: float = 30.0) -> None:
        """Wait until every balancer named answers the challenge (the routes reached it)."""
        deadline = time.monotonic() + patience
        for address in self.s.balancers:
            host, _, port = address.rpartition(":")
            while True:
                if _fetch(host, int(port), hostname, CHALLENGE_PATH + token) == expected:
                    break
                if time.monotonic() > deadline:
                    raise AcmeFailed(f"balancer {address} does not answer the challenge for "
                                     f"{hostname} after {patience:.0f}s")
                time.sleep(0.05)

    def _acme(self) -> Any:
        """The ACME client, its account registered on first use."""
        if self._client is not None:
            return self._client
        import josepy as jose
        from acme import client, errors, messages

        jwk = jose.JWKRSA(key=_account_key(self.s.account_key))
        net = client.ClientNetwork(jwk, user_agent="tally-acme",
                                   verify_ssl=self.s.ca_bundle or True)  # type: ignore[arg-type]
        directory = client.ClientV2.get_directory(self.s.directory, net)
        acme = client.ClientV2(directory, net)
        try:
            acme.new_account(messages.NewRegistration.from_data(
                terms_of_service_agreed=True))
        except errors.ConflictError as exc:  # this key has an account already
            net.account = acme.query_registration(messages.RegistrationResource(
                uri=exc.location, body=messages.Registration()))
        self._client = acme
        return acme


def _fetch(host: str, port: int, hostname: str, path: str) -> str | None:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": hostname})
        reply = conn.getresponse()
        body = reply.read().decode("ascii", "replace")
        return body if reply.status == 200 else None
    except OSError:
        return None
    finally:
        conn.close()


def _account_key(path: Path) -> Any:
    """The ACME account's RSA key, made (0600) on first use."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return key


def balancers_of(addresses: Sequence[str]) -> tuple[str, ...]:
    """HOST:PORT of the balancers to self-check, as given (validated)."""
    for a in addresses:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"balancer {a!r} is not HOST:PORT")
    return tuple(addresses)
