"""An app's certificates: `tally certs:add` (an operator's own chain and key, checked and
sealed here, ledger/tls.py) and `tally certs` (what the app has, never a key). The balancers
get them with the routes (projectors/routes.py), the keys still sealed."""

from __future__ import annotations

from typing import Any

from flask.typing import ResponseReturnValue

from api import decide, schemas
from api.errors import NotFound, Unavailable, Unprocessable
from api.routes_apps import app_state
from api.state import AppState, Cert
from api.web import body, reply, route, services, who
from ledger.events import NewEvent
from ledger.hostnames import platform_hostname
from ledger.tls import Certificate, CertificateRefused, check_certificate, seal


def cert_row(c: Cert) -> dict[str, Any]:
    return {"cert_id": c.cert_id, "hostnames": list(c.hostnames), "not_after": c.not_after,
            "source": c.source, "added_at": c.added_at}


def add_certificate(s: AppState, cert: Certificate, sealed: str,
                    suffix: str) -> list[NewEvent]:
    """CertificateAdded, if the certificate covers one of the app's hostnames at least (a
    certificate for nothing the app answers would only ever be served to another app's
    visitors)."""
    decide.require_app(s)
    names = [platform_hostname(s.name, suffix), *s.domains]
    if not any(cert.covers(n) for n in names):
        raise Unprocessable(f"the certificate ({', '.join(cert.hostnames)}) covers none of "
                            f"{s.name}'s hostnames ({', '.join(names)})",
                            {"cert": ["covers none of the app's hostnames"]})
    if any(c.cert_id == cert.cert_id for c in s.certificates):
        return []
    return [NewEvent("CertificateAdded", {
        "app": s.name, "cert_id": cert.cert_id, "hostnames": list(cert.hostnames),
        "not_after": cert.not_after.isoformat(), "cert_pem": cert.cert_pem,
        "key_sealed": sealed})]


@route("/apps/<name>/certs", response=schemas.Rows, tag="certs", errors=(401, 403, 404))
def list_certs(name: str) -> ResponseReturnValue:
    """The app's certificates: id, hostnames, expiry, manual or acme (never a key)."""
    return reply(schemas.Rows, {"items": [cert_row(c) for c in app_state(name).certificates]})


@route("/apps/<name>/certs", "POST", body=schemas.CertAdd, response=schemas.CertInfo,
       status=201, tag="certs", errors=(400, 401, 403, 404, 409, 422, 503))
def add_cert(name: str) -> ResponseReturnValue:
    """Add a certificate chain (PEM, leaf first) and its private key (PEM): 422 unless they
    are a pair, valid now, covering one of the app's hostnames. The key is sealed before it
    is recorded."""
    app_state(name)  # first: who may not touch the app learns nothing of the body's faults
    req = body(schemas.CertAdd)
    svc = services()
    if svc.settings.seal_key is None:
        raise Unavailable("this API has no seal key (TALLY_SEAL_KEY): it cannot keep "
                          "private keys")
    try:
        cert = check_certificate(req["cert"], req["key"])
    except CertificateRefused as exc:
        raise Unprocessable(str(exc), {"cert": [str(exc)]}) from None
    sealed = seal(svc.settings.seal_key, cert.key_pem)
    suffix = svc.suffix()
    state = svc.command(name, who(), lambda s: add_certificate(s, cert, sealed, suffix))
    found = next(c for c in state.certificates if c.cert_id == cert.cert_id)
    return reply(schemas.CertInfo, cert_row(found), 201)


@route("/apps/<name>/certs/<cert_id>", "DELETE", response=schemas.CertInfo, tag="certs",
       errors=(401, 403, 404, 409))
def remove_cert(name: str, cert_id: str) -> ResponseReturnValue:
    """Stop serving a certificate."""
    found = next((c for c in app_state(name).certificates if c.cert_id == cert_id), None)
    if found is None:
        raise NotFound(f"app {name} has no certificate {cert_id}")

    def remove(s: AppState) -> list[NewEvent]:
        decide.require_app(s)
        if not any(c.cert_id == cert_id for c in s.certificates):
            return []
        return [NewEvent("CertificateRemoved", {"app": s.name, "cert_id": cert_id})]

    services().command(name, who(), remove)
    return reply(schemas.CertInfo, cert_row(found))
