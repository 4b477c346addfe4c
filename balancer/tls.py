"""TLS termination: one certificate per hostname, chosen by SNI as routes are (an exact name,
else the longest `*.suffix` wildcard, else the default).

Certificates come from a folder: `<hostname>.crt` (the chain, leaf first) beside
`<hostname>.key`, a wildcard named as written (`*.example.com.crt`), and `default.crt` for
clients that send no name or a name we have no certificate for (else the first one). The
folder is read again when a file in it changes. Each context allows TLS 1.2 and 1.3 only,
Python's default (forward-secret, AEAD) cipher suites, and session resumption (tickets).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

DEFAULT = "default"


class CertificateError(ValueError):
    """A certificate or key we cannot use."""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(f"{cert.name}: {exc}") from None
    return ctx


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
        self.context = self._front()

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
