"""TLS termination: one certificate per hostname, chosen by SNI as routes are (an exact name,
else the longest `*.suffix` wildcard, else the default).

On the platform, certificates come with the routes (`RouteCertificates`): each route carries
its app's certificate for that hostname with the private key sealed (ledger/tls.py), opened
here with the seal key and handed to OpenSSL through a file that holds it encrypted again
under a one-time password, so no key is ever on disk in the clear. SNI picks the certificate
of the route the router would choose for the name.

Certificates also come from a folder (standalone mode, or a platform's fallback):
`<hostname>.crt` (the chain, leaf first) beside `<hostname>.key`, a wildcard named as
written (`*.example.com.crt`), and `default.crt` for clients that send no name or a name we
have no certificate for (else the first one). The folder is read again when a file in it
changes. Each context allows TLS 1.2 and 1.3 only, Python's default (forward-secret, AEAD)
cipher suites, and session resumption (tickets).
"""

from __future__ import annotations

import os
import secrets
import ssl
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from balancer.routing import Route, Router

DEFAULT = "default"


class CertificateError(ValueError):
    """A certificate or key we cannot use."""


def _new_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def server_context(cert: Path, key: Path, password: bytes | None = None) -> ssl.SSLContext:
    ctx = _new_context()
    try:
        ctx.load_cert_chain(cert, key, password=password)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(f"{cert.name}: {exc}") from None
    return ctx


def context_from_pem(cert_pem: str, key_pem: str) -> ssl.SSLContext:
    """A server context for a PEM chain and a PEM key held in memory. OpenSSL reads keys
    from files only: the key goes to a private temporary file encrypted under a one-time
    password, never in the clear."""
    from cryptography.hazmat.primitives import serialization

    password = secrets.token_hex(32).encode()
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"a key that does not load: {exc}") from None
    locked = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.BestAvailableEncryption(password))
    with tempfile.TemporaryDirectory(prefix="tally-tls-") as folder:
        (Path(folder) / "chain.pem").write_text(cert_pem)
        (Path(folder) / "key.pem").write_bytes(locked)
        return server_context(Path(folder) / "chain.pem", Path(folder) / "key.pem", password)


class RouteCertificates:
    """The contexts of the certificates the routes carry (one per certificate id, made once),
    and the front context whose SNI callback picks the one of the route the router would
    choose for the name; else the fallback folder's (if any)."""

    def __init__(self, router: Router, open_key: Callable[[str], str],
                 fallback: Certificates | None = None) -> None:
        self.router, self.open_key, self.fallback = router, open_key, fallback
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.errors: dict[str, str] = {}
        self.context: ssl.SSLContext = _new_context()
        if fallback is not None and fallback.default is not None:
            self.context = fallback.context  # its own certificate answers no-SNI clients
        self.context.sni_callback = self._pick

    def refresh(self, routes: Iterable[Route]) -> list[str]:
        """Make contexts for certificates not seen before, forget those no route carries;
        what could not be loaded, said once per certificate."""
        wanted = {r.tls[0]: r.tls for r in routes if r.tls is not None}
        said = []
        for cert_id, (_, chain, sealed) in wanted.items():
            if cert_id in self.contexts or cert_id in self.errors:
                continue
            try:
                self.contexts[cert_id] = context_from_pem(chain, self.open_key(sealed))
            except ValueError as exc:  # CertificateError, CertificateRefused (a wrong seal key)
                self.errors[cert_id] = str(exc)
                said.append(f"certificate {cert_id} not loaded: {exc}")
        self.contexts = {k: v for k, v in self.contexts.items() if k in wanted}
        self.errors = {k: v for k, v in self.errors.items() if k in wanted}
        return said

    def lookup(self, name: str) -> ssl.SSLContext | None:
        hit = self.router.lookup(name.lower().rstrip("."))
        if hit is not None and hit[0].tls is not None:
            ctx = self.contexts.get(hit[0].tls[0])
            if ctx is not None:
                return ctx
        if self.fallback is not None:
            return self.fallback.lookup(name) or self.fallback.default
        return None

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None,
              _ctx: ssl.SSLContext) -> int | None:
        ctx = self.lookup(server_name or "")
        if ctx is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = ctx  # type: ignore[misc]
        return None


class Certificates:
    """Hostname -> context, and the context whose SNI callback picks among them."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._stamp: tuple = ()
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wild: dict[str, ssl.SSLContext] = {}
        self.default: ssl.SSLContext | None = None
        self.names: list[str] = []
        self.reload()
        if self.default is None:
            raise CertificateError(f"no certificate (NAME.crt with NAME.key) in {self.folder}")
        self.context: ssl.SSLContext = self._front()

    def _front(self) -> ssl.SSLContext:
        assert self.default is not None
        front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        front.minimum_version = ssl.TLSVersion.TLSv1_2
        front.set_alpn_protocols(["http/1.1"])
        for name in self.names:  # the front needs a certificate of its own: any will do
            front.load_cert_chain(self.folder / f"{name}.crt", self.folder / f"{name}.key")
            break
        front.sni_callback = self._pick
        return front

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None,
              _ctx: ssl.SSLContext) -> None:
        sslobj.context = self.lookup(server_name or "") or self.default  # type: ignore
        return None

    def lookup(self, name: str) -> ssl.SSLContext | None:
        name = name.lower().rstrip(".")
        hit = self.exact.get(name)
        if hit is not None:
            return hit
        dot = name.find(".")
        while dot >= 0:
            hit = self.wild.get(name[dot:])
            if hit is not None:
                return hit
            dot = name.find(".", dot + 1)
        return None

    def stamp(self) -> tuple:
        try:
            return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                                for e in os.scandir(self.folder)))
        except OSError:
            return ()

    def reload(self) -> bool:
        """Read the folder again if it changed; whether it did. A pair that does not load
        is left out (and said on stderr by the caller's log); the others still serve."""
        stamp = self.stamp()
        if stamp == self._stamp:
            return False
        exact: dict[str, ssl.SSLContext] = {}
        wild: dict[str, ssl.SSLContext] = {}
        default = None
        names = []
        self.errors: list[str] = []
        for crt in sorted(self.folder.glob("*.crt")):
            name = crt.name[:-len(".crt")].lower()
            try:
                ctx = server_context(crt, crt.with_suffix(".key"))
            except CertificateError as exc:
                self.errors.append(str(exc))
                continue
            names.append(name)
            if name == DEFAULT:
                default = ctx
            elif name.startswith("*."):
                wild[name[1:]] = ctx
            else:
                exact[name] = ctx
            if default is None:
                default = ctx
        if names:
            self.exact, self.wild, self.default, self.names = exact, wild, default, names
        self._stamp = stamp
        return True
