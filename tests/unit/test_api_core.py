"""The API's pure core without PostgreSQL: folding an app stream, the decisions, bundle
checks, the token directory, error mapping, the OpenAPI document."""

from __future__ import annotations

import io
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from api import auth, bundles, decide
from api.errors import Conflict, NotFound, TooLarge, Unprocessable
from api.state import AppState, fold, summary
from ledger import (
    InvalidEvent,
    LedgerUnavailable,
    NewEvent,
    RecordedEvent,
    VersionConflict,
    archives,
)
from tests.api_process import pack_files

NOW = datetime(2026, 11, 26, tzinfo=UTC)


def recorded(events: list[NewEvent], stream: str = "app-blog", actor: str = "ann",
             start: int = 1) -> list[RecordedEvent]:
    return [RecordedEvent(start + i, start + i, stream, start + i, e.type, e.data,
                          {"actor": actor}, NOW) for i, e in enumerate(events)]


def run(state: AppState, events: list[NewEvent]) -> AppState:
    return fold(state.name, recorded(events, start=state.version + 1), state)


def blog(*procs: str) -> AppState:
    s = run(AppState("blog"), decide.create_app(AppState("blog"), "ann"))
    if procs:
        s = run(s, decide.new_release(s, "a" * 64, {p: f"run {p}" for p in procs}, "v1"))
    return s


def test_create_and_fold() -> None:
    s = blog()
    assert s.exists and s.owner == "ann" and s.version == 1 and s.may_manage("ann")
    with pytest.raises(Conflict):
        decide.create_app(s, "bob")
    assert summary(s)["release"] is None


def test_first_release_with_web_scales_web_to_one() -> None:
    s = blog("web", "worker")
    assert s.current.number == 1 and s.scale == {"web": 1}
    s = run(s, decide.new_release(s, "b" * 64, {"web": "x"}, "v2"))
    assert s.current.number == 2 and s.scale == {"web": 1}
    assert blog("worker").scale == {}


def test_scale_only_known_process_types_after_a_release() -> None:
    with pytest.raises(Unprocessable, match="deploy first"):
        decide.scale(blog(), {"web": 1})
    s = blog("web", "worker")
    with pytest.raises(Unprocessable, match="no process type clock"):
        decide.scale(s, {"clock": 1})
    s = run(s, decide.scale(s, {"worker": 3}))
    assert s.scale == {"web": 1, "worker": 3}


def test_config_changes_make_releases_and_rollback_restores_config() -> None:
    s = blog()
    s = run(s, decide.change_config(s, {"A": "1"}, []))
    assert s.config == {"A": "1"} and s.releases == ()
    s = run(s, decide.new_release(s, "a" * 64, {"web": "x"}, ""))
    s = run(s, decide.change_config(s, {"B": "2"}, ["A"]))
    assert s.config == {"B": "2"} and s.current.number == 2 and s.current.config_version == 2
    s = run(s, decide.rollback(s, 1))
    assert s.current.number == 3 and s.current.rollback_of == 1
    assert s.config == {"A": "1"} and s.current.bundle_digest == "a" * 64
    with pytest.raises(Unprocessable):
        decide.rollback(s, 3)
    with pytest.raises(Unprocessable):
        decide.change_config(s, {}, [])
    with pytest.raises(Unprocessable, match="invalid config var"):
        decide.change_config(s, {"1X": "y"}, [])


def test_rollback_default_is_previous_and_needs_a_release() -> None:
    with pytest.raises(Unprocessable):
        decide.rollback(blog(), None)
    s = blog("web")
    s = run(s, decide.new_release(s, "b" * 64, {"web": "y"}, ""))
    assert decide.rollback(s, None)[-1].data["rollback_of"] == 1


@pytest.mark.parametrize("domain,suffix", [
    ("blog.tally.local", "tally.local"), ("tally.local", "tally.local"),
    ("*.tally.local", "tally.local"), ("*.local", "tally.local"),
    ("*.x.tally.local", "tally.local"), ("a.localhost", "localhost"),
    ("*.localhost", "localhost")])
def test_no_domain_under_or_covering_the_platform_suffix(domain: str, suffix: str) -> None:
    with pytest.raises(Unprocessable) as refused:
        decide.add_domain(blog("web"), domain, suffix)
    assert refused.value.fields == {"domain": [f"under or covering the platform suffix {suffix}"]}


@pytest.mark.parametrize("domain", ["blog.example.com", "*.example.com", "tally.local.example",
                                    "blog.tally.localx", "*.ally.local"])
def test_domains_beside_the_suffix_are_free(domain: str) -> None:
    assert decide.add_domain(blog("web"), domain, "tally.local")[0].data["domain"] == domain


def test_delete_keeps_history_and_only_its_last_owner_may_take_the_name() -> None:
    s = run(blog("web"), decide.add_domain(blog("web"), "blog.example.com", "tally.local"))
    events = decide.delete_app(s)
    assert [e.type for e in events] == ["DomainRemoved", "AppDeleted"]
    s = run(s, events)
    assert not s.exists and s.scale == {"web": 0}
    with pytest.raises(NotFound):
        decide.scale(s, {"web": 1})
    with pytest.raises(Conflict):  # bob would read ann's old config values in the history
        decide.create_app(s, "bob")
    s = run(s, decide.create_app(s, "ann"))
    assert s.exists and s.owner == "ann" and s.releases == () and s.domains == ()


@pytest.mark.parametrize("raw, norm", [
    ("WWW.Example.com.", "www.example.com"), ("*.apps.example.com", "*.apps.example.com"),
])
def test_domains_normalised(raw: str, norm: str) -> None:
    assert decide.normalise_domain(raw) == norm


@pytest.mark.parametrize("bad", ["", "localhost", "a..b", "*.*.x.com", "x_y.com", "-a.com",
                                 "a.com/x", "*", "a" * 64 + ".com"])
def test_bad_domains(bad: str) -> None:
    with pytest.raises(Unprocessable):
        decide.normalise_domain(bad)


def test_domain_claims() -> None:
    assert decide.domain_stream("*.x.com") == "domain-wildcard:x.com"
    assert decide.domain_stream("x.com") == "domain-x.com"
    assert decide.claim_holder([]) is None
    assert decide.claim_holder([("DomainClaimed", "a"), ("DomainReleased", "a")]) is None
    assert decide.claim_holder([("DomainClaimed", "a"), ("DomainReleased", "a"),
                                ("DomainClaimed", "b")]) == "b"


def test_maintenance_and_members_are_idempotent() -> None:
    s = blog()
    assert decide.set_maintenance(s, False) == []
    s = run(s, decide.set_maintenance(s, True))
    assert s.maintenance and decide.set_maintenance(s, True) == []
    assert decide.add_member(s, "ann") == []
    s = run(s, decide.add_member(s, "bob"))
    assert s.may_manage("bob")
    s = run(s, decide.remove_member(s, "bob"))
    assert not s.may_manage("bob")
    with pytest.raises(NotFound):
        decide.remove_member(s, "bob")


# --- bundles ---------------------------------------------------------------------------------


def test_procfile_parsing() -> None:
    assert bundles.parse_procfile("# c\n\nweb: gunicorn a:b\nworker:  python w.py\n") == {
        "web": "gunicorn a:b", "worker": "python w.py"}
    with pytest.raises(Unprocessable, match="line 2"):
        bundles.parse_procfile("web: x\nWeb Server: y\n")
    with pytest.raises(Unprocessable, match="no process type"):
        bundles.parse_procfile("# nothing\n")


def test_receive_limits_and_digests(tmp_path: Path) -> None:
    data = pack_files({"Procfile": "web: x", "requirements.txt": ""})
    path, digest = bundles.receive(io.BytesIO(data), tmp_path, limit=len(data))
    import hashlib
    assert digest == hashlib.sha256(data).hexdigest() and path.read_bytes() == data
    assert bundles.inspect(path) == {"web": "x"}
    with pytest.raises(TooLarge):
        bundles.receive(io.BytesIO(data), tmp_path, limit=len(data) - 1)
    with pytest.raises(Unprocessable):
        bundles.receive(io.BytesIO(b""), tmp_path, limit=10)
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "refused uploads are removed"


def _tar(tmp_path: Path, *members: tarfile.TarInfo) -> Path:
    path = tmp_path / "b.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ("Procfile", "requirements.txt"):
            info = tarfile.TarInfo(name)
            info.size = 6
            tar.addfile(info, io.BytesIO(b"web: x"))
        for m in members:
            tar.addfile(m)
    return path


@pytest.mark.parametrize("kind, name, target", [
    (tarfile.SYMTYPE, "up", "../x"), (tarfile.SYMTYPE, "abs", "/etc/passwd"),
    (tarfile.SYMTYPE, "a/b/up", "../../../x"), (tarfile.LNKTYPE, "hard", "../x"),
    (tarfile.CHRTYPE, "dev", ""), (tarfile.FIFOTYPE, "fifo", ""),
    (tarfile.DIRTYPE, "../out", ""), (tarfile.DIRTYPE, "/root", ""),
])
def test_unsafe_members_refused(tmp_path: Path, kind: bytes, name: str, target: str) -> None:
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, target
    with pytest.raises(Unprocessable, match="unsafe bundle"):
        bundles.inspect(_tar(tmp_path, m))


def test_links_inside_the_folder_are_fine(tmp_path: Path) -> None:
    m = tarfile.TarInfo("static/current")
    m.type, m.linkname = tarfile.SYMTYPE, "../assets"
    assert bundles.inspect(_tar(tmp_path, m)) == {"web": "x"}


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, target
    return m


@pytest.mark.parametrize("links", [
    [("d", "."), ("d/l", "..")],         # written through d, l lands at ./l -> ..
    [("d", "."), ("e", "d/..")],         # d/.. is the folder's parent, not the folder
    [("a", "b"), ("b", "a")],            # a loop
    [("d", "x/y"), ("x/y", ".."), ("e", "d/..")],
    [("d", "."), ("h", "d/../x", tarfile.LNKTYPE)],
])
def test_links_leading_out_through_other_links_refused(tmp_path: Path,
                                                       links: list[tuple]) -> None:
    """Each link alone looks inside; followed as the unpacking follows them, one leads
    out of the folder."""
    with pytest.raises(Unprocessable, match="unsafe bundle"):
        bundles.inspect(_tar(tmp_path, *(_link(*link) for link in links)))


def test_chained_links_inside_the_folder_are_fine(tmp_path: Path) -> None:
    links = [_link("static", "assets/v2"), _link("current", "static/css"),
             _link("assets/v2/up", "..")]
    assert bundles.inspect(_tar(tmp_path, *links)) == {"web": "x"}


def _zeros(path: Path, size: int) -> Path:
    """A bundle whose one big file is `size` zero bytes (it compresses a thousandfold)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("Procfile", b"web: x"), ("requirements.txt", b""),
                           ("zeros", bytes(size))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_static_files_declaration_is_checked_at_upload(tmp_path: Path) -> None:
    """static.json (beside the Procfile) must parse, or the deploy is refused with why,
    before any build; a good one, or none, passes."""
    def bundle(static: str | None) -> Path:
        files = {"Procfile": "web: x", "requirements.txt": ""}
        if static is not None:
            files["static.json"] = static
        path = tmp_path / "s.tar.gz"
        path.write_bytes(pack_files(files))
        return path

    assert bundles.inspect(bundle('{"/static/": "static"}')) == {"web": "x"}
    assert bundles.inspect(bundle(None)) == {"web": "x"}
    for bad, why in (('{"/static/": "../.."}', "not inside the app"),
                     ('{"static": "static"}', "prefixes start and end with /"),
                     ("[]", "must map URL prefixes"), ("{", "not JSON"),
                     ("{}", "must map URL prefixes"),
                     ("[" * 60_000, "nested too deeply")):  # review 4: a 500 before
        with pytest.raises(Unprocessable, match=why) as refused:
            bundles.inspect(bundle(bad))
        assert "static.json" in str(refused.value)
    with pytest.raises(Unprocessable, match="static.json must be a regular file"):
        bundles.inspect(_tar(tmp_path, _link("static.json", "Procfile")))


def test_bundles_that_unpack_too_large_refused(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A small tar.gz may unpack to gigabytes, or to millions of entries."""
    monkeypatch.setattr(archives, "MAX_ENTRIES", 5)
    dirs = [tarfile.TarInfo(f"d{i}") for i in range(5)]
    for d in dirs:
        d.type = tarfile.DIRTYPE
    with pytest.raises(Unprocessable, match="entries"):
        bundles.inspect(_tar(tmp_path, *dirs))
    monkeypatch.setattr(archives, "MAX_ENTRIES", 100)
    path = _zeros(tmp_path / "zeros.tar.gz", 2000)
    with pytest.raises(Unprocessable, match="unpacks to more than"):
        bundles.inspect(path, max_unpacked=1000)  # the app's unpacked-size limit
    assert bundles.inspect(path, max_unpacked=10_000) == {"web": "x"}


def test_a_compression_bomb_is_refused_before_it_is_unpacked(tmp_path: Path) -> None:
    """64 MiB of zeros in a ~64 KiB tar.gz: within the size limits, but 1000 to 1."""
    path = _zeros(tmp_path / "bomb.tar.gz", 64 << 20)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(Unprocessable, match="compression bomb"):
        bundles.inspect(path)
    with pytest.raises(archives.ArchiveRefused, match="compression bomb"):
        archives.check(1, 64 << 20, 64 << 10, archives.MAX_UNPACKED_BYTES)
    archives.check(3, 10 << 20, 10 << 10, archives.MAX_UNPACKED_BYTES)  # small: no ratio
    archives.check(3, 400 << 20, 100 << 20, archives.MAX_UNPACKED_BYTES)  # 4 to 1: fine


def test_saved_credentials_are_private_even_over_an_older_file(tmp_path: Path) -> None:
    from tally.client import save_credentials
    from tally.config import credentials_path

    path = credentials_path({"TALLY_CREDENTIALS": str(tmp_path / "credentials.json")})
    path.write_text("{}")
    path.chmod(0o644)
    save_credentials(path, "http://x", "tly_secret", "ann")
    assert path.stat().st_mode & 0o777 == 0o600
    assert credentials_path({"XDG_CONFIG_HOME": str(tmp_path)}) == (
        tmp_path / "tally" / "credentials.json")


def test_directory_issues_looks_up_and_revokes() -> None:
    token, events = auth.user_events("ann", "member")
    d = auth.Directory()
    d.apply(recorded(events, stream="user-ann"))
    assert token.startswith("tly_") and token not in str(events)
    who = d.lookup(token)
    assert who is not None and who.name == "ann" and who.role == "member"
    assert d.lookup(token + "x") is None
    token_id = events[1].data["token_id"]
    d.apply(recorded([NewEvent("TokenRevoked", {"user": "ann", "token_id": token_id})],
                     stream="user-ann", start=3))
    assert d.lookup(token) is None and d.position == 3


def test_directory_knows_who_manages_which_app() -> None:
    d = auth.Directory()
    d.apply(recorded([NewEvent("AppCreated", {"name": "blog", "owner": "ann"}),
                      NewEvent("AppMemberAdded", {"app": "blog", "user": "bob"})]))
    assert d.manages("ann", "blog") and d.manages("bob", "blog")
    d.apply(recorded([NewEvent("AppDeleted", {"name": "blog"})], start=3))
    assert not d.manages("ann", "blog")


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer  ", "Basic x", "tly_x"])
def test_bearer_refuses_malformed_headers(header: str | None) -> None:
    from api.errors import Unauthorized
    with pytest.raises(Unauthorized):
        auth.bearer(header)


def test_roles_and_hosts() -> None:
    from api.errors import Forbidden
    agent = auth.Principal("a1", "agent", "h1")
    auth.require_host(agent, "h1")
    auth.require_host(auth.Principal("root", "admin"), "h9")
    for who, host in ((agent, "h2"), (auth.Principal("m", "member"), "h1")):
        with pytest.raises(Forbidden):
            auth.require_host(who, host)
    with pytest.raises(Forbidden):
        auth.require_role(agent, "admin", "member")


# --- errors and the OpenAPI document --------------------------------------------------------


@pytest.mark.parametrize("exc, status, code", [
    (VersionConflict("app-x", 3, 4), 409, "conflict"),
    (InvalidEvent("bad", {"f": ["x"]}), 422, "invalid_event"),
    (LedgerUnavailable("down"), 503, "unavailable"),
    (Conflict("taken", current={"a": 1}), 409, "conflict"),
    (KeyError("boom"), 500, "internal"),
])
def test_error_mapping(exc: Exception, status: int, code: str) -> None:
    from api.app import error_body
    got_status, body = error_body(exc)
    assert (got_status, body["error"]) == (status, code)
    assert set(body) >= {"error", "message", "fields"} and "boom" not in body["message"]


def test_openapi_documents_every_route_with_schemas() -> None:
    from api.openapi import spec
    from api.web import ROUTES, openapi_path
    doc: dict[str, Any] = spec()
    for r in ROUTES:
        if r.documented:
            op = doc["paths"][openapi_path(r.rule)][r.method.lower()]
            assert str(r.status) in op["responses"] and op["summary"]
    assert doc["paths"]["/apps"]["post"]["requestBody"]["content"]["application/json"]


def test_unknown_tokens_at_once_share_one_forced_refresh() -> None:
    """An unknown token forces a directory refresh (it may have just been issued), but a
    flood of them must not read the ledger once each, holding the lock every request
    waits on: a refresh that began after a request arrived answers it."""
    import threading
    import time

    from api.errors import Unauthorized
    from api.services import Services, Settings

    class SlowLedger:
        forced = 0

        def sequence(self) -> int:
            SlowLedger.forced += 1
            time.sleep(0.05)
            return 0

        def head(self) -> int:
            return 0

        def read_all(self, *args: Any, **kwargs: Any) -> list:
            return []

    class Offline(Services):
        ledger = SlowLedger()  # type: ignore[assignment]

    svc = Offline(Settings("", Path("/nonexistent")))
    start = threading.Barrier(8)

    def ask() -> None:
        start.wait()
        with pytest.raises(Unauthorized):
            svc.authenticate("Bearer tly_unknown")
    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert SlowLedger.forced <= 3


def test_a_deleted_apps_bundles_are_unneeded_unless_shared_or_fresh() -> None:
    ages = {"a": 3600.0, "b": 3600.0, "c": 5.0}
    assert bundles.unneeded(["a", "b", "c", "d"], needed={"b"}, ages=ages) == ["a"]
    assert bundles.unneeded(["c"], needed=set(), ages=ages, grace=1.0) == ["c"]


def test_a_run_goes_in_the_newest_built_release() -> None:
    """A config change makes a release before any builder has marked it built; an agent
    has nothing to run in it yet, so a one-off goes to the newest built release (it went
    to v2 and failed until a builder came, which in the runs tests' platform none does)."""
    from api import runs

    s = blog("web")
    s = run(s, decide.change_config(s, {"LEVEL": "3"}, []))
    assert s.current.number == 2
    built = {1}
    (started,) = runs.start(s, ["true"], "h1", False, lambda r: r.number in built, 50, 0.0)
    assert started.data["release"] == 1
    built.add(2)
    assert runs.start(s, ["true"], "h1", False, lambda r: r.number in built, 50, 0.0
                      )[0].data["release"] == 2
    with pytest.raises(Conflict, match="no built release"):
        runs.start(s, ["true"], "h1", False, lambda r: False, 50, 0.0)
    with pytest.raises(Unprocessable, match="deploy first"):
        runs.start(blog(), ["true"], "h1", False, lambda r: True, 50, 0.0)


def test_runs_going_at_once_are_held_to_the_apps_quota() -> None:
    """Review 4: one-off runs counted against nothing (8 detached runs for an app whose
    quota was 1 instance), each with an instance's memory, disk and log allowance."""
    from api import runs
    from ledger.tickets import TTL_S

    s = blog("web")
    now = 1_800_000_000.0  # a time after the folded events' recorded time (2026-11-26)
    for _ in range(2):
        s = run(s, runs.start(s, ["sleep", "1d"], "h1", True, lambda r: True, 2, now))
    with pytest.raises(Conflict, match="2 one-off run"):
        runs.start(s, ["true"], "h1", True, lambda r: True, 2, now)
    assert runs.going(s, now) == 2
    s = run(s, [NewEvent("RunEnded", {"app": "blog", "number": 1, "run_id": s.runs[0].run_id,
                                      "exit_code": 0, "host_id": "h1"})])
    s = run(s, runs.start(s, ["bash"], "h1", False, lambda r: True, 2, now))  # attached
    attached_at = runs.started(s.runs[-1], now)
    assert runs.going(s, attached_at) == 2
    assert runs.going(s, attached_at + 10 * TTL_S) == 1, "never attached: its slot given back"


def test_a_since_time_is_moved_to_utc_or_refused() -> None:
    """ISO allows offsets PostgreSQL refuses (+20:48; schemathesis found the 500) and
    instants that leave Python's range once moved to UTC: the first is moved, the second
    is a validation error (422), neither reaches the database as it came."""
    from datetime import UTC, datetime

    from marshmallow import ValidationError

    from api.schemas import EventsQuery

    moved = EventsQuery().load({"since": "0219-07-28T14:51:36.4+20:48"})["since"]
    assert moved == datetime(219, 7, 27, 18, 3, 36, 400000, tzinfo=UTC)
    with pytest.raises(ValidationError, match="out of range"):
        EventsQuery().load({"since": "0001-01-01T00:00:00+14:00"})
