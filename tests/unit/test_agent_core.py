"""The host agent's pure parts: the plan (desired vs running), backoff, and bundle checks."""

from __future__ import annotations

import hashlib
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from agents.builder import extract_bundle
from agents.bundle import BundleRefused
from agents.supervision import (
    CHECK_EVERY,
    Local,
    State,
    Want,
    after_check,
    after_exit,
    backoff,
    plan,
)
from tests.fixtures.apps import app_tarball, tarball

WEB = Want("blog.1.web.a", "blog", 1, "web", 7000, "d" * 64, "gunicorn app:app")
PHASE = Want("blog.1.release.b", "blog", 1, "release", 7001, "d" * 64, "python m.py")


def kinds(actions: list) -> list[tuple[str, str]]:
    return [(a.kind, a.instance_id) for a in actions]


def test_a_new_placement_is_prepared_and_a_starting_one_checked() -> None:
    assert kinds(plan({WEB.instance_id: WEB}, {}, 0)) == [("prepare", WEB.instance_id)]
    local = {WEB.instance_id: Local(WEB.instance_id, State.STARTING, 10, want=WEB)}
    assert kinds(plan({WEB.instance_id: WEB}, local, 0)) == [("check", WEB.instance_id)]
    local[WEB.instance_id].state = State.HEALTHY
    local[WEB.instance_id].next_check = 5.0
    assert plan({WEB.instance_id: WEB}, local, 0) == []


def test_an_unwanted_instance_is_stopped_then_killed_after_the_grace() -> None:
    loc = Local(WEB.instance_id, State.HEALTHY, 10, want=WEB)
    assert kinds(plan({}, {WEB.instance_id: loc}, 0)) == [("stop", WEB.instance_id)]
    loc.state, loc.stop_deadline = State.STOPPING, 10.0
    assert plan({}, {WEB.instance_id: loc}, 9.9) == []
    assert kinds(plan({}, {WEB.instance_id: loc}, 10.0)) == [("kill", WEB.instance_id)]


def test_an_adopted_process_no_longer_placed_is_stopped_not_restarted() -> None:
    loc = Local(WEB.instance_id, State.STARTING, 10, want=None)
    assert kinds(plan({}, {WEB.instance_id: loc}, 0)) == [("stop", WEB.instance_id)]


def test_a_crash_restarts_after_an_exponential_backoff() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4, 10)] == [1, 2, 4, 8, 30]
    loc = after_exit(Local(WEB.instance_id, State.HEALTHY, 10, want=WEB), 3, now=100.0)
    assert (loc.state, loc.restarts, loc.next_start, loc.exit_codes) == (
        State.EXITED, 1, 101.0, [3])
    assert plan({WEB.instance_id: WEB}, {WEB.instance_id: loc}, 100.5) == []
    assert kinds(plan({WEB.instance_id: WEB}, {WEB.instance_id: loc}, 101)) == [
        ("prepare", WEB.instance_id)]
    after_exit(loc, 3, now=101.0)
    assert loc.next_start == 103.0


def test_a_healthy_web_instance_is_checked_and_killed_after_three_failures() -> None:
    loc = Local(WEB.instance_id, State.STARTING, 10, want=WEB)
    assert after_check(loc, False, 0) is None and loc.state is State.STARTING
    assert after_check(loc, True, 1) == "healthy" and loc.next_check == 1 + CHECK_EVERY
    wants = {WEB.instance_id: WEB}
    assert plan(wants, {WEB.instance_id: loc}, 2) == []
    assert kinds(plan(wants, {WEB.instance_id: loc}, 1 + CHECK_EVERY)) == [
        ("check", WEB.instance_id)]
    assert [after_check(loc, False, t) for t in (10, 20)] == [None, None]
    assert after_check(loc, True, 30) is None  # an answer resets the count
    assert [after_check(loc, False, t) for t in (40, 50, 60)] == [None, None, "kill"]


def test_a_release_phase_runs_once() -> None:
    loc = after_exit(Local(PHASE.instance_id, State.STARTING, 10, want=PHASE), 0, now=5)
    assert loc.state is State.DONE
    assert plan({PHASE.instance_id: PHASE}, {PHASE.instance_id: loc}, 100) == []
    assert kinds(plan({}, {PHASE.instance_id: loc}, 100)) == [("forget", PHASE.instance_id)]


def _store(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    digest = hashlib.sha256(data).hexdigest()
    path = tmp_path / f"{digest}.tar.gz"
    path.write_bytes(data)
    return path, digest


def _entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "",
           data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


PROCFILE = _entry("Procfile", data=b"web: gunicorn app:app\n")


@pytest.mark.parametrize(("entries", "reason"), [
    ([_entry("app.py")], "no Procfile"),
    ([PROCFILE, _entry("../evil.py")], "points outside"),
    ([PROCFILE, _entry("/tmp/evil.py")], "points outside"),
    ([PROCFILE, _entry("a/../../evil.py")], "points outside"),
    ([PROCFILE, _entry("link", tarfile.SYMTYPE, "/etc/passwd")], "leads outside"),
    ([PROCFILE, _entry("d/link", tarfile.SYMTYPE, "../../x")], "leads outside"),
    ([PROCFILE, _entry("dev", tarfile.CHRTYPE)], "not a file"),
    ([PROCFILE, _entry("hard", tarfile.LNKTYPE, "Procfile")], "not a file"),
])
def test_unsafe_bundles_are_refused_by_the_builder(tmp_path: Path, entries: list,
                                                   reason: str) -> None:
    path, digest = _store(tmp_path, tarball(entries))
    into = tmp_path / "app"
    into.mkdir()
    with pytest.raises(BundleRefused, match=reason):
        extract_bundle(path, digest, into, None)
    assert list(into.iterdir()) == []


def test_a_bundle_whose_digest_does_not_match_is_refused(tmp_path: Path) -> None:
    path, _ = _store(tmp_path, app_tarball("hello"))
    with pytest.raises(BundleRefused, match="does not match"):
        extract_bundle(path, "0" * 64, tmp_path, None)


def test_statsd_datagrams_count_requests_per_instance() -> None:
    from agents.stats import parse

    datagram = (b"blog.1.web.a.gunicorn.requests:1|c\n"
                b"blog.1.web.a.gunicorn.request.duration:12.5|ms\n"
                b"blog.1.web.a.gunicorn.requests:2|c|@1.0\n"
                b"shop.2.web.b.gunicorn.requests:1|c\n"
                b"garbage\nx.gunicorn.requests:nan?|c\n")
    assert parse(datagram) == {"blog.1.web.a": 3, "shop.2.web.b": 1}


def test_health_checks_are_not_traffic_even_when_counted_late() -> None:
    from agents.stats import Traffic

    t = Traffic()
    t.checked["i"] += 3
    t.served["i"] += 2  # one check's count is still on its way
    assert t.report("i") == 0
    t.served["i"] += 1 + 5  # it arrives, with 5 requests of real traffic
    assert t.report("i") == 5
    assert t.report("i") == 0  # each request reported once


def test_a_statsd_sender_counts_only_for_its_own_instance() -> None:
    """Who sent a datagram is the kernel's word (agents/stats.py): naming another app's
    instance, or a sibling, counts nothing; a sender of no instance counts nothing."""
    from agents.stats import ANY_APP, own_counts

    named = Counter({"blog.1.web.a": 2, "shop.1.web.b": 123457, "blog.1.web.c": 5})
    assert own_counts(named, "blog.1.web.a") == {"blog.1.web.a": 2}
    assert own_counts(named, "shop.1.web.b") == {"shop.1.web.b": 123457}
    assert own_counts(named, None) == {}
    assert own_counts(named, ANY_APP) == named


def test_the_sender_is_the_instance_holding_its_socket() -> None:
    from agents.stats import holding

    sockets = {100: {11, 12}, 200: {21}}
    leaders = {"blog.1.web.a": 100, "blog.1.web.c": 200}
    assert holding(21, leaders, lambda pid: sockets.get(pid, set())) == "blog.1.web.c"
    assert holding(99, leaders, lambda pid: sockets.get(pid, set())) is None


def test_udp_senders_are_the_sockets_of_loopback_ports() -> None:
    """/proc/net/udp's columns: local address:port (hex), ..., uid, timeout, inode; a port
    two sockets share is nobody's."""
    from agents.stats import Sender, udp_senders

    table = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout
  101: 0100007F:1F90 0100007F:2328 01 00000000:00000000 00:00000000 00000000 200001 0 501 2 0
  102: 00000000:1F91 00000000:0000 07 00000000:00000000 00:00000000 00000000 200002 0 502 2 0
  103: 0202000A:1F92 00000000:0000 07 00000000:00000000 00:00000000 00000000 200003 0 503 2 0
  104: 0100007F:1F93 00000000:0000 07 00000000:00000000 00:00000000 00000000 200004 0 504 2 0
  105: 00000000:1F93 00000000:0000 07 00000000:00000000 00:00000000 00000000 200004 0 505 2 0
"""
    assert udp_senders(table) == {0x1F90: Sender(200001, 501), 0x1F91: Sender(200002, 502)}


def test_statsd_counts_are_kept_only_for_the_sending_instance(tmp_path: Path) -> None:
    """Real UDP: this process holds the sending socket, so it is 'instance' a.1.web.x (the
    kernel's /proc/net/udp and this process's fds say so); its count for b.1.web.y is
    refused."""
    import os
    import socket

    from agents.stats import StatsListener, holding, socket_inodes
    from tests.waiting import wait_until

    listener = StatsListener(owner=lambda sender: holding(
        sender.inode, {"a.1.web.x": os.getpid()}, socket_inodes))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:  # open, as gunicorn's
            to = ("127.0.0.1", listener.port)
            sender.sendto(b"b.1.web.y.gunicorn.requests:123457|c", to)
            sender.sendto(b"a.1.web.x.gunicorn.requests:3|c", to)
            got: Counter = Counter()
            wait_until(lambda: got.update(listener.take()) or got["a.1.web.x"] == 3, 10,
                       "the own count taken")
            assert got == {"a.1.web.x": 3}
            wait_until(lambda: listener.refused == 123457, 10, "the other's count refused")
    finally:
        listener.close()
