"""The ACME agent's decisions (agents/acme.py `Book`), in memory: which of an app's domains
get a certificate ordered, which certificate an order renews, and the back-off after a
failure. No CA, no ledger."""

from __future__ import annotations

from datetime import timedelta

from agents.acme import Book, Due
from tests.unit.test_why import T0, History, recorded

DAY = timedelta(days=1)


def _cert(h: History, cert_id: str, names: list[str], ends_in: timedelta) -> None:
    h.add("app-blog", "CertificateAdded", app="blog", cert_id=cert_id * 16, hostnames=names,
          not_after=(T0 + ends_in).isoformat(), cert_pem="chain", key_sealed="sealed")


def test_due_domains_renewals_and_back_off() -> None:
    h = History("blog").running("blog")
    for name in ("www.blog.example", "api.blog.example", "ok.blog.example", "*.w.example"):
        h.domain("blog", name)
    _cert(h, "a", ["api.blog.example"], 1 * DAY)  # ends tomorrow: renewed
    _cert(h, "b", ["ok.blog.example"], 90 * DAY)  # good for long: left alone
    book = Book()
    book.apply(recorded(h.appends))
    due = book.due(T0, renew_before=30 * DAY, retry_after=timedelta(minutes=10))
    assert due == [Due("blog", "api.blog.example", "a" * 16),
                   Due("blog", "www.blog.example", None)], "no wildcard, no platform name"

    h.add("app-blog", "CertificateFailed", app="blog", hostnames=["www.blog.example"],
          error="rate limited")
    book = Book()
    book.apply(recorded(h.appends))
    soon = T0 + timedelta(minutes=1)
    assert [d.hostname for d in book.due(soon, 30 * DAY, timedelta(minutes=10))] == [
        "api.blog.example"], "a failed name waits before it is ordered again"
    later = T0 + timedelta(minutes=11)
    assert len(book.due(later, 30 * DAY, timedelta(minutes=10))) == 2

    h.add("app-blog", "CertificateRenewed", app="blog", cert_id="c" * 16,
          hostnames=["api.blog.example"], not_after=(T0 + 90 * DAY).isoformat(),
          cert_pem="chain", key_sealed="sealed", renews="a" * 16)
    h.add("app-blog", "DomainRemoved", app="blog", domain="www.blog.example")
    book = Book()
    book.apply(recorded(h.appends))
    assert book.due(later, 30 * DAY, timedelta(minutes=10)) == []
    assert set(book.certs) == {"b" * 16, "c" * 16}
