"""The balancer in platform mode on a private ledger: it reads the routes view through the
API with its own balancer token (the ledger's ports given to it lead nowhere: it holds no
ledger credentials), follows a route change, and a balancer restarted (kill -9) while the
API is down still routes, from the last routes it read (its cache), instead of answering
404 for every app. The routing endpoint opens to that balancer's token only.

HTTPS end to end: `tally certs:add` (a bad pair refused with a message), the key sealed in
the ledger and in the balancer's cache, served by SNI on the balancer's TLS port; and
`tally config:set TALLY_FORCE_HTTPS=1 TALLY_HSTS=...` turning on the redirect and HSTS;
then the router's metrics of those requests in `tally stats`."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from api.auth import create_user
from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from ledger.tls import new_seal_key
from tests.backends import Upstream
from tests.certs import self_signed, tls_get
from tests.conftest import destroy_cluster, free_ports, make_cluster
from tests.fixtures.apps.fleet import ApiProc, Daemon
from tests.waiting import wait_until


@pytest.fixture
def private() -> Iterator[Cluster]:
    c = make_cluster()
    yield c
    destroy_cluster(c)


def status(port: int, host: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": host})
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def seed(ledger: Ledger, app: str, backend: Upstream) -> None:
    """An app whose one healthy web instance (of its deployed release 1) is `backend`."""
    ledger.append(f"app-{app}", [
        NewEvent("AppCreated", {"name": app, "owner": "ann"}),
        NewEvent("ReleaseCreated", {"app": app, "release": 1, "bundle_digest": "0" * 64,
                                    "procfile": {"web": "true"}, "config_version": 0})])
    ledger.append(f"placement-{app}", [NewEvent("ReleaseDeployed", {"app": app, "release": 1})])
    ledger.append("host-c1", [NewEvent("HostRegistered", {
        "host_id": "c1", "address": "127.0.0.1", "port_min": backend.port,
        "port_max": backend.port, "capacity": 1})])
    ledger.append(f"placement-{app}1", [NewEvent("InstancePlaced", {
        "instance_id": f"{app}1", "app": app, "release": 1, "process_type": "web",
        "host_id": "c1", "port": backend.port})])
    ledger.append(f"instance-{app}1", [NewEvent("InstanceHealthy", {
        "instance_id": f"{app}1", "host_id": "c1"})])


def https_platform(private: Cluster, api: ApiProc, plain: int, tls_port: int,
                   seal_key: str) -> list[Daemon]:
    """The projectors and a balancer on `plain` and `tls_port` reading routes through
    `api` (started), its keys opened with `seal_key`; no relay (timers), no collector."""
    daemons = [Daemon(private, "projectors", ["projectors", "--poll-interval", "0.1"]),
               Daemon(private, "balancer", [
                   "balancer", "--bind", f"127.0.0.1:{plain}", "--tls-bind",
                   f"127.0.0.1:{tls_port}", "--balancer-id", "bs", "--stats-every", "0.5"],
                   TALLY_BALANCER_API=api.url, TALLY_BALANCER_TOKEN=api.token("bs", "balancer"),
                   TALLY_SEAL_KEY=seal_key, TALLY_RELAYS=f"tcp://127.0.0.1:{free_ports(1)[0]}",
                   TALLY_COLLECTOR=f"tcp://127.0.0.1:{free_ports(1)[0]}")]
    for d in daemons:
        d.start()
    return daemons


def test_routes_through_the_api_and_from_the_cache_while_the_api_is_down(
        private: Cluster) -> None:
    backend = Upstream("a")
    port = free_ports(1)[0]
    nowhere = [f"tcp://127.0.0.1:{p}" for p in free_ports(2)]  # no relay: timers
    api = ApiProc(private, "api-balancer")
    home = private.root.parent
    daemons: list[Daemon] = [api]

    def balancer() -> Daemon:
        d = Daemon(private, "balancer", ["balancer", "--bind", f"127.0.0.1:{port}",
                                         "--balancer-id", "bt"],
                   TALLY_BALANCER_API=api.url, TALLY_BALANCER_TOKEN=api.token("bt", "balancer"),
                   TALLY_RELAYS=",".join(nowhere),  # nor another session's log collector:
                   TALLY_COLLECTOR=f"tcp://127.0.0.1:{free_ports(1)[0]}",
                   TALLY_LEDGER_PORTS=",".join(map(str, free_ports(2))))  # no ledger
        d.start()
        daemons.append(d)
        return d

    try:
        with Ledger(private.dsn()) as ledger:
            seed(ledger, "cached", backend)
        api.start()
        projectors = Daemon(private, "projectors", ["projectors", "--poll-interval", "0.2"])
        projectors.start()
        daemons.append(projectors)
        first = balancer()
        wait_until(lambda: status(port, "cached.tally.local") == 200, 60,
                   "the balancer never routed from the routes view through the API")
        assert status(port, "nope.tally.local") == 404
        assert (home / "run" / f"balancer-{port}.routes.json").exists()

        with Ledger(private.dsn()) as ledger:
            ledger.append("app-cached", [NewEvent("MaintenanceChanged", {
                "app": "cached", "enabled": True})])
        wait_until(lambda: status(port, "cached.tally.local") == 503, 30,
                   "the balancer never saw the app go into maintenance")

        first.kill()
        api.kill()  # the API is down
        balancer()
        wait_until(lambda: status(port, "cached.tally.local") == 503, 30,
                   "a balancer started while the API is down did not route from its cache")
        assert "routes not read" in (home / "balancer.log").read_text()
    finally:
        for d in daemons:
            d.kill()
        backend.close()


def test_the_routing_table_opens_to_its_balancer_only(private: Cluster) -> None:
    api = ApiProc(private, "api-routing")
    api.start()
    try:
        url = f"{api.url}/balancers/bx/routing"

        def get(token: str | None, u: str = url) -> requests.Response:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return requests.get(u, headers=headers, timeout=10)

        mine = get(api.token("bx", "balancer"))
        assert mine.status_code == 200, mine.text
        assert mine.json()["changed"] is False  # nothing routed yet: version 0 = after 0
        assert get(None).status_code == 401
        assert get(api.token("by", "balancer")).status_code == 403  # another balancer's
        assert get(api.token("bx")).status_code == 403  # an agent token of that host id
        assert get(api.token("bx", "balancer"), url + "?after=-1").status_code == 422
        # A balancer token opens nothing else: not the fleet's routes, not the hosts.
        for path in ("/routes", "/hosts", "/apps"):
            assert get(api.token("bx", "balancer"), api.url + path).status_code == 403, path
    finally:
        api.kill()


def test_a_balancer_token_reads_only_the_slug_the_routes_serve(private: Cluster) -> None:
    """Static files come from the newest serving release's slug: a balancer's token opens
    that slug and no other of the app's (its code), as an agent's opens only what is
    placed on its host."""
    backend = Upstream("s")
    api = ApiProc(private, "api-slugs")
    projectors = Daemon(private, "projectors", ["projectors", "--poll-interval", "0.1"])
    try:
        with Ledger(private.dsn()) as ledger:
            seed(ledger, "slugs", backend)
            ledger.append("app-slugs", [NewEvent("ReleaseCreated", {
                "app": "slugs", "release": 2, "bundle_digest": "0" * 64,
                "procfile": {"web": "true"}, "config_version": 0})])
            for n, digest in ((1, "1" * 64), (2, "2" * 64)):
                ledger.append(f"build-slugs.{n + 1}", [NewEvent("BuildSucceeded", {
                    "app": "slugs", "release": n, "slug_digest": digest, "size_bytes": 1,
                    "seconds": 1.0})])
        api.start()
        projectors.start()
        token = api.token("bz", "balancer")

        def served() -> int | None:
            rows = requests.get(f"{api.url}/balancers/bz/routing", timeout=10, headers={
                "Authorization": f"Bearer {token}"}).json().get("routes", [])
            slugs = [r["slug"]["release"] for r in rows if r.get("slug")]
            return slugs[0] if slugs else None

        serving = wait_until(served, 60, "the routes never named a slug")

        def slug(n: int) -> int:
            return requests.get(f"{api.url}/apps/slugs/releases/{n}/slug", timeout=10,
                                headers={"Authorization": f"Bearer {token}"}).status_code

        other = 1 if serving == 2 else 2
        assert slug(other) == 403
        assert slug(serving) != 403  # (404: this test stored no slug file)
    finally:
        projectors.kill()
        api.kill()
        backend.close()


def test_certificates_and_https_settings_reach_the_balancer_through_the_api(
        private: Cluster, tmp_path: Path) -> None:
    backend = Upstream("a")
    plain, tls_port = free_ports(2)
    seal_key = new_seal_key()
    api = ApiProc(private, "api-certs", TALLY_SEAL_KEY=seal_key)
    home = private.root.parent
    daemons: list[Daemon] = [api]
    host = "secure.tally.local"
    try:
        with Ledger(private.dsn()) as ledger:
            seed(ledger, "secure", backend)
            admin = create_user(ledger, "certs-admin", "admin")
        api.start()
        daemons += https_platform(private, api, plain, tls_port, seal_key)

        def tally(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "tally.cli", *args], text=True,
                                  capture_output=True, timeout=120,
                                  env={**os.environ, "TALLY_API": api.url,
                                       "TALLY_TOKEN": admin})

        cert, key = self_signed([host])
        _, other_key = self_signed([host])
        elsewhere, elsewhere_key = self_signed(["elsewhere.example"])
        files = {}
        for name, text in (("cert", cert), ("key", key), ("other", other_key),
                           ("elsewhere", elsewhere), ("elsewhere-key", elsewhere_key)):
            files[name] = tmp_path / f"{name}.pem"
            files[name].write_text(text)

        refused = tally("certs:add", "-a", "secure", "--cert", str(files["cert"]), "--key",
                        str(files["other"]))
        assert refused.returncode == 1 and "does not match" in refused.stderr, refused
        answer = requests.post(f"{api.url}/apps/secure/certs", timeout=30,
                               json={"cert": cert, "key": other_key},
                               headers={"Authorization": f"Bearer {admin}"})
        assert answer.status_code == 422 and "does not match" in answer.json()["message"]
        refused = tally("certs:add", "-a", "secure", "--cert", str(files["elsewhere"]),
                        "--key", str(files["elsewhere-key"]))
        assert refused.returncode == 1 and "covers none" in refused.stderr, refused

        added = tally("certs:add", "-a", "secure", "--cert", str(files["cert"]), "--key",
                      str(files["key"]))
        assert added.returncode == 0, added
        listed = json.loads(tally("certs", "-a", "secure", "--json").stdout)
        assert [c["hostnames"] for c in listed] == [[host]] and "key" not in listed[0]
        assert listed[0]["cert_id"] in added.stderr

        der = ssl.PEM_cert_to_DER_cert(cert)

        def served() -> bool:
            try:
                got, reply = tls_get(tls_port, host)
            except OSError:
                return False
            return got == der and reply.startswith(b"HTTP/1.1 200 ")
        wait_until(served, 60, "the balancer never served the certificate added by SNI")
        reply = tls_get(tls_port, host)[1]
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["headers"][
            "x-forwarded-proto"] == "https"

        secret = "".join(key.splitlines()[1:-1])  # the key's base64, wherever it would be
        with Ledger(private.dsn()) as ledger:
            recorded = json.dumps([e.data for e in ledger.read_stream("app-secure")])
        assert "key_sealed" in recorded and secret[:40] not in recorded
        cached = (home / "run" / f"balancer-{plain}.routes.json").read_text()
        assert "BEGIN CERTIFICATE" in cached and secret[:40] not in cached

        bad = tally("config:set", "-a", "secure", "TALLY_HSTS=forever")
        assert bad.returncode == 1 and "max-age" in bad.stderr, bad
        ok = tally("config:set", "-a", "secure", "TALLY_FORCE_HTTPS=1", "TALLY_HSTS=max-age=600")
        assert ok.returncode == 0, ok

        def redirected() -> str | None:
            conn = http.client.HTTPConnection("127.0.0.1", plain, timeout=5)
            try:
                conn.request("GET", "/x?y=1", headers={"Host": host})
                r = conn.getresponse()
                return r.getheader("Location") if r.status == 308 else None
            except OSError:
                return None
            finally:
                conn.close()
        location = wait_until(redirected, 60, "plain HTTP never redirected to HTTPS")
        assert location == f"https://{host}:{tls_port}/x?y=1"
        assert b"\r\nStrict-Transport-Security: max-age=600\r\n" in tls_get(tls_port, host)[1]

        # Router metrics: the balancer's samples reach `tally stats` through the API.
        def router() -> dict | None:
            out = tally("stats", "-a", "secure", "--json")
            r = json.loads(out.stdout)["router"] if out.returncode == 0 else {}
            return r if r.get("s3xx") and r.get("s2xx") else None
        seen = wait_until(router, 60, "router samples never reached tally stats")
        assert seen["requests"] >= seen["s2xx"] + seen["s3xx"] and seen["p99_ms"] is not None
        assert "router: " in tally("stats", "-a", "secure").stdout
    finally:
        for d in daemons:
            d.kill()
        backend.close()
