"""HTTPS as the platform records it: the config vars that ask the balancers for a redirect to
HTTPS and for HSTS, an app's certificate (checked before it is recorded), and private keys
sealed for storage (the ledger, the balancers' caches) so that none is ever at rest in the
clear.

The API (certs:add), the ACME agent and the routes projector all read these rules here, and
the balancers open sealed keys with the same function: one definition of each.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

FORCE_HTTPS = "TALLY_FORCE_HTTPS"
"""Config var: `1`/`true`/`yes`/`on` -> plain HTTP requests get a 308 to https://."""
HSTS = "TALLY_HSTS"
"""Config var: the Strict-Transport-Security value sent over HTTPS, e.g. max-age=31536000."""
TRUE = ("1", "true", "yes", "on")
FALSE = ("", "0", "false", "no", "off")
HSTS_VALUE = re.compile(r"max-age=\d{1,10}(;\s*includeSubDomains)?(;\s*preload)?", re.I)


class CertificateRefused(ValueError):
    """A certificate or key the platform will not use; the message says why."""


def https_config_error(name: str, value: str) -> str | None:
    """Why `value` is no good for one of the HTTPS config vars (None: fine, or another var)."""
    if name == FORCE_HTTPS and value.strip().lower() not in TRUE + FALSE:
        return f"{FORCE_HTTPS} must be one of {', '.join(TRUE + FALSE[1:])}"
    if name == HSTS and value and not HSTS_VALUE.fullmatch(value.strip()):
        return f"{HSTS} must look like max-age=31536000[; includeSubDomains][; preload]"
    return None


def https_flags(before: tuple[bool, str], set_: Mapping[str, str],
                unset: Sequence[str]) -> tuple[bool, str]:
    """(redirect to HTTPS, HSTS value) after a ConfigChanged. A value the API would refuse
    (an event appended by hand) counts as unset: a balancer never sends a malformed header."""
    https_only, hsts = before
    if FORCE_HTTPS in unset:
        https_only = False
    if HSTS in unset:
        hsts = ""
    if FORCE_HTTPS in set_:
        https_only = set_[FORCE_HTTPS].strip().lower() in TRUE
    if HSTS in set_:
        value = set_[HSTS].strip()
        hsts = value if https_config_error(HSTS, value) is None else ""
    return https_only, hsts


# --- Certificates -----------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """A checked certificate chain (leaf first) and its key."""

    cert_id: str
    """The leaf's sha256 fingerprint, first 16 hex digits."""
    hostnames: tuple[str, ...]
    not_after: datetime
    cert_pem: str
    key_pem: str

    def covers(self, hostname: str) -> bool:
        return any(covers(name, hostname) for name in self.hostnames)


def covers(name: str, hostname: str) -> bool:
    """Whether a certificate name (`blog.example.com`, `*.example.com`) is good for
    `hostname`; a wildcard covers one label, as in TLS (RFC 6125), and a wildcard route
    (`*.example.com`) only with the same wildcard."""
    if name == hostname:
        return True
    if not name.startswith("*.") or hostname.startswith("*."):
        return False
    first, _, rest = hostname.partition(".")
    return bool(first) and rest == name[2:]


def check_certificate(cert_pem: str, key_pem: str, now: datetime | None = None) -> Certificate:
    """Parse a PEM chain and a PEM key; CertificateRefused unless they are a pair, the leaf
    is valid now and names at least one DNS name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    now = now or datetime.now(UTC)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem.encode())
    except ValueError as exc:
        raise CertificateRefused(f"the certificate is not PEM X.509: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateRefused(f"the key is not an unencrypted PEM private key: {exc}"
                                 ) from None
    leaf = chain[0]
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if key.public_key().public_bytes(pem, raw) != leaf.public_key().public_bytes(pem, raw):
        raise CertificateRefused("the key does not match the certificate")
    if leaf.not_valid_after_utc <= now:
        raise CertificateRefused(f"the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    if leaf.not_valid_before_utc > now:
        raise CertificateRefused("the certificate is not valid yet")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [n.lower().rstrip(".") for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [str(a.value).lower() for a in leaf.subject.get_attributes_for_oid(
            NameOID.COMMON_NAME)]
    if not names:
        raise CertificateRefused("the certificate names no DNS name")
    fingerprint = leaf.fingerprint(hashes.SHA256()).hex()[:16]
    return Certificate(fingerprint, tuple(sorted(set(names))), leaf.not_valid_after_utc,
                       cert_pem.strip() + "\n", key_pem.strip() + "\n")


# --- Sealing private keys -----------------------------------------------------------------


def new_seal_key() -> str:
    """A key to seal private keys with (Fernet: AES-128-CBC + HMAC-SHA256), as text."""
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def seal(seal_key: str, secret: str) -> str:
    from cryptography.fernet import Fernet

    return Fernet(seal_key.encode()).encrypt(secret.encode()).decode()


def unseal(seal_key: str, sealed: str) -> str:
    """The secret; CertificateRefused if the seal key is not the one it was sealed with."""
    from cryptography.fernet import Fernet, InvalidToken

    try:
        return Fernet(seal_key.encode()).decrypt(sealed.encode()).decode()
    except (InvalidToken, ValueError):
        raise CertificateRefused("a sealed key does not open with this seal key") from None
