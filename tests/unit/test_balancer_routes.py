"""What the balancers get beyond backends, in memory: HTTPS as the platform records it
(ledger/tls.py: certificates checked before they are recorded, wildcard coverage, the HTTPS
config vars, sealed keys) and as the routes view carries it (projectors/routes.py: which
certificate each route gets, ACME challenges), and the slug whose static files they serve."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ledger.tls import (
    CertificateRefused,
    check_certificate,
    covers,
    https_config_error,
    https_flags,
    new_seal_key,
    seal,
    unseal,
)
from tests.certs import self_signed
from tests.unit.test_projectors import rows, views
from tests.unit.test_why import History


def test_a_certificate_is_checked_before_it_is_recorded() -> None:
    cert, key = self_signed(["www.blog.example", "blog.example"])
    checked = check_certificate(cert, key)
    assert checked.hostnames == ("blog.example", "www.blog.example")
    assert len(checked.cert_id) == 16 and int(checked.cert_id, 16) >= 0
    assert checked.not_after > datetime.now(UTC) + timedelta(days=29)
    _, other_key = self_signed(["www.blog.example"])
    expired = self_signed(["old.example"], days=1, start=datetime.now(UTC) - timedelta(days=3))
    early = self_signed(["soon.example"], start=datetime.now(UTC) + timedelta(days=1))
    for bad_cert, bad_key, why in [
        (cert, other_key, "does not match"),
        (*expired, "expired"),
        (*early, "not valid yet"),
        ("not a certificate", key, "not PEM"),
        (cert[:200], key, "not PEM"),
        (cert, "not a key", "not an unencrypted PEM private key"),
    ]:
        with pytest.raises(CertificateRefused, match=why):
            check_certificate(bad_cert, bad_key)


def test_wildcards_cover_one_label_and_wildcard_routes_only_the_same_wildcard() -> None:
    assert covers("*.blog.example", "www.blog.example")
    assert not covers("*.blog.example", "a.b.blog.example")
    assert not covers("*.blog.example", "blog.example")
    assert covers("*.blog.example", "*.blog.example")
    assert not covers("www.blog.example", "*.blog.example")
    assert covers("blog.example", "blog.example")


def test_the_https_config_vars() -> None:
    assert https_config_error("TALLY_FORCE_HTTPS", "maybe")
    assert https_config_error("TALLY_FORCE_HTTPS", "on") is None
    assert https_config_error("TALLY_HSTS", "max-age=31536000; includeSubDomains") is None
    assert https_config_error("TALLY_HSTS", "max-age=1\r\nSet-Cookie: x=1")
    assert https_config_error("OTHER", "anything") is None
    flags = https_flags((False, ""), {"TALLY_FORCE_HTTPS": "1", "TALLY_HSTS": "max-age=60"}, [])
    assert flags == (True, "max-age=60")
    assert https_flags(flags, {}, ["TALLY_HSTS"]) == (True, "")
    assert https_flags(flags, {"TALLY_FORCE_HTTPS": "off"}, []) == (False, "max-age=60")
    assert https_flags(flags, {"TALLY_HSTS": "bogus\x00"}, [])[1] == "", "never a bad header"


def test_sealed_keys_open_only_with_their_seal_key() -> None:
    key = new_seal_key()
    sealed = seal(key, "-----BEGIN PRIVATE KEY-----\nsecret\n")
    assert "secret" not in sealed
    assert unseal(key, sealed) == "-----BEGIN PRIVATE KEY-----\nsecret\n"
    with pytest.raises(CertificateRefused, match="does not open"):
        unseal(new_seal_key(), sealed)


def _cert_event(h: History, type_: str, cert_id: str, names: list[str], not_after: str,
                **extra: str) -> None:
    h.add("app-blog", type_, app="blog", cert_id=cert_id, hostnames=names,
          not_after=not_after, cert_pem=f"chain {cert_id}", key_sealed=f"sealed {cert_id}",
          **extra)


def test_routes_carry_the_https_settings_and_the_certificate_covering_them() -> None:
    h = History("blog").running("blog")
    h.domain("blog", "www.blog.example").domain("blog", "*.blog.example")
    h.add("app-blog", "ConfigChanged", app="blog", config_version=1,
          set={"TALLY_FORCE_HTTPS": "yes", "TALLY_HSTS": "max-age=300", "OTHER": "x"})
    _cert_event(h, "CertificateAdded", "a" * 16, ["*.blog.example"], "2027-03-01T00:00:00")
    _cert_event(h, "CertificateAdded", "b" * 16, ["www.blog.example"], "2027-01-01T00:00:00")
    routes = {r["hostname"]: r for r in rows(views(h), "routes")}
    assert routes["www.blog.example"]["https_only"] and \
        routes["www.blog.example"]["hsts"] == "max-age=300"
    assert routes["www.blog.example"]["tls"]["cert_id"] == "b" * 16, "exact before wildcard"
    assert routes["*.blog.example"]["tls"]["key"] == "sealed " + "a" * 16
    assert routes["blog.tally.local"]["tls"] is None  # no certificate covers it

    _cert_event(h, "CertificateRenewed", "c" * 16, ["www.blog.example"], "2027-06-01T00:00:00",
                renews="b" * 16)
    h.add("app-blog", "ConfigChanged", app="blog", config_version=2, set={},
          unset=["TALLY_FORCE_HTTPS"])
    routes = {r["hostname"]: r for r in rows(views(h), "routes")}
    assert routes["www.blog.example"]["tls"]["cert_id"] == "c" * 16
    assert not routes["www.blog.example"]["https_only"]
    h.add("app-blog", "CertificateRemoved", app="blog", cert_id="c" * 16)
    routes = {r["hostname"]: r for r in rows(views(h), "routes")}
    assert routes["www.blog.example"]["tls"]["cert_id"] == "a" * 16, "the wildcard's, then"

    h.add("app-blog", "AppDeleted", name="blog").created().released()
    assert all(r["tls"] is None for r in rows(views(h), "routes")), \
        "an app made again has no certificate of the one deleted"


def test_acme_challenges_are_routed_to_their_hostname_until_the_order_ends() -> None:
    h = History("blog").running("blog").domain("blog", "www.blog.example")
    h.add("app-blog", "CertificateRequested", app="blog", hostnames=["www.blog.example"],
          challenges={"tok1": {"hostname": "www.blog.example", "key_authorization": "tok1.k"}})
    routes = {r["hostname"]: r for r in rows(views(h), "routes")}
    assert routes["www.blog.example"]["challenges"] == {"tok1": "tok1.k"}
    assert routes["blog.tally.local"]["challenges"] == {}
    h.add("app-blog", "CertificateFailed", app="blog", hostnames=["www.blog.example"],
          error="urn:ietf:params:acme:error:connection")
    assert all(r["challenges"] == {} for r in rows(views(h), "routes"))


def test_routes_name_the_slug_of_the_newest_serving_release() -> None:
    h = History("blog").running("blog")
    assert rows(views(h), "routes")[0]["slug"] is None  # not built (yet)
    h.add("build-blog.2", "BuildSucceeded", app="blog", release=1, slug_digest="a" * 64,
          size_bytes=10, seconds=1.0)
    assert rows(views(h), "routes")[0]["slug"] == {"release": 1, "digest": "a" * 64}
    h.add("placement-blog", "ReleaseDeployed", app="blog", release=1)
    h.released(2).add("build-blog.3", "BuildSucceeded", app="blog", release=2,
                      slug_digest="b" * 64, size_bytes=10, seconds=1.0)
    h.add("placement-blog", "ReleaseFailed", app="blog", release=2, reason="crashed")
    assert rows(views(h), "routes")[0]["slug"]["digest"] == "a" * 64, "a failed one: never"
