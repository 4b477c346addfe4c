"""Logs survive the collector being away and the agent being killed: every line reaches
the collector's files exactly once. Real processes, real ZeroMQ; the shipping side is the
agent's Shipper in a process of its own (what `tally serve agent` runs every pass)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from tests.conftest import free_ports
from tests.waiting import wait_until

SHIPPER = """
import sys, time, json
from pathlib import Path
from agents.logs import Shipper
from ledger import curve
logs, endpoint, report = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
secrets = Path(sys.argv[4])  # the collector admits the control plane's key (no ledger here)
shipper = Shipper(endpoint, logs, curve=curve.Client(
    curve.load_or_create(secrets / "collector.curve").public,
    curve.load_or_create(secrets / "control.curve")))
sent = 0
while True:
    sent += shipper.ship(running=None)
    tmp = report.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sent": sent, "acked": shipper.offsets}))
    tmp.replace(report)
    time.sleep(0.05)
"""


def _shipper(logs: Path, endpoint: str, report: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SHIPPER, str(logs), endpoint, str(report),
                             str(logs.parent / "secrets")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _collector(home: Path, endpoint: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tally.cli", "serve", "collector",
                             "--bind", endpoint], env={**os.environ, "TALLY_HOME": str(home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _report(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"sent": 0, "acked": {}}


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def test_collector_away_and_agent_killed_lose_nothing_and_repeat_nothing() -> None:
    home = Path(tempfile.mkdtemp(prefix="tally-logs-"))
    logs, report = home / "instance-logs", home / "report.json"
    logs.mkdir()
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    log = logs / "blog.1.web.a.log"
    received = home / "applogs" / "blog" / "current.log"

    def lines() -> list[str]:
        text = received.read_text() if received.exists() else ""
        return [line.split(" ", 2)[2] for line in text.splitlines()]

    def write(first: int, last: int) -> None:
        with open(log, "a") as f:
            f.write("".join(f"line {n}\n" for n in range(first, last)))

    collector, shipper = _collector(home, endpoint), _shipper(logs, endpoint, report)
    try:
        write(0, 100)
        wait_until(lambda: len(lines()) >= 100, 60, "the first lines reached the collector")
        _kill(collector)  # the collector goes away ...
        write(100, 200)
        size = log.stat().st_size
        # ... while the agent hands the new lines to ZeroMQ (queued for a peer that is gone)
        wait_until(lambda: _report(report)["sent"] >= size, 30, "the shipper sent the rest")
        assert _report(report)["acked"].get("blog.1.web.a", 0) < size
        _kill(shipper)  # ... and the agent is killed before they were delivered
        collector = _collector(home, endpoint)
        shipper = _shipper(logs, endpoint, report)
        write(200, 250)
        size = log.stat().st_size
        wait_until(lambda: _report(report)["acked"].get("blog.1.web.a") == size, 60,
                   "the new agent's lines acknowledged")
        got = Counter(lines())
        assert sorted(got, key=lambda x: int(x.split()[1])) == [
            f"line {n}" for n in range(250)], "a line was lost"
        assert set(got.values()) == {1}, [k for k, v in got.items() if v > 1][:5]
    finally:
        for proc in (shipper, collector):
            if proc.poll() is None:
                _kill(proc)
        subprocess.run(["rm", "-rf", str(home)], check=False)


def test_a_batch_sent_twice_is_written_once(tmp_path: Path) -> None:
    """The collector's side alone: the same bytes again (an acknowledgement lost), an
    overlap, a gap, and a new epoch after the host emptied the file."""
    from agents.logs import Collector

    c = Collector(tmp_path)
    assert c.receive("blog", "blog.1.web.a", 0, 0, b"a\nb\n") == (0, 4)
    assert c.receive("blog", "blog.1.web.a", 0, 0, b"a\nb\n") == (0, 4)  # again: nothing
    assert c.receive("blog", "blog.1.web.a", 0, 2, b"b\nc\n") == (0, 6)  # overlap: c only
    assert c.receive("blog", "blog.1.web.a", 0, 9, b"z\n") == (0, 6)  # gap: wait
    assert c.receive("blog", "blog.1.web.a", 1, 0, b"d\n") == (1, 2)  # emptied: new count
    assert c.receive("blog", "blog.1.web.a", 0, 6, b"late\n") == (1, 2)  # old epoch
    c.save()
    assert Collector(tmp_path).marks == {"blog.1.web.a": [1, 2]}
    text = (tmp_path / "blog" / "current.log").read_text().splitlines()
    assert [t.split(" ", 2)[2] for t in text] == ["a", "b", "c", "d"]


def test_a_collector_killed_between_its_write_and_its_save_writes_nothing_twice(
        tmp_path: Path) -> None:
    """Lines written but not yet marked saved (a kill -9 between the two: the test above
    killed it there now and then, and the host sent them again) are cut when the collector
    starts again; sent again, they are written once."""
    from agents.logs import Collector

    c = Collector(tmp_path)
    c.receive("blog", "blog.1.web.a", 0, 0, b"a\nb\n")
    c.save()
    c.receive("blog", "blog.1.web.a", 0, 4, b"c\n")  # written; killed before its save
    again = Collector(tmp_path)
    assert again.receive("blog", "blog.1.web.a", 0, 4, b"c\nd\n") == (0, 8)
    text = (tmp_path / "blog" / "current.log").read_text().splitlines()
    assert [t.split(" ", 2)[2] for t in text] == ["a", "b", "c", "d"]


def test_an_app_keeps_its_newest_chunks_only(tmp_path: Path) -> None:
    """An app that logs without end fills no collector's disk: past `keep_chunks` rotated
    chunks the oldest go, and what it wrote last is all there."""
    from agents.logs import Collector, chunks

    c = Collector(tmp_path, max_bytes=1000, keep_chunks=3)
    for n in range(100):
        c.receive("blog", "blog.1.web.a", 0, n * 100, f"{n:099d}\n".encode())
    kept = chunks(tmp_path, "blog")
    assert len(kept) == 4 and sum(p.stat().st_size for p in kept) < 5000, kept
    assert kept[-1].read_text().splitlines()[-1].endswith(f"{99:099d}")


def test_a_host_adds_lines_only_to_the_instances_placed_on_it(ledger: Any, cluster: Any,
                                                               tmp_path: Path) -> None:
    """The review's last collector hole: any registered host could add lines to any
    instance it named. Now host B's lines for host A's instance or detached run are
    refused (and unacknowledged), A's are written, the control plane's (balancers' access
    logs) are trusted, an unknown key's refused."""
    from agents.logs import Collector
    from agents.placed import Placed
    from ledger import NewEvent
    from tests.integration.test_api import uid

    app = f"placed-{uid()}"
    iid = f"{app}.1.web.a1"
    ledger.append(f"placement-{app}", [NewEvent("InstancePlaced", {
        "instance_id": iid, "app": app, "release": 1, "process_type": "web",
        "host_id": "ha", "port": 5000})])
    ledger.append(f"app-{app}", [NewEvent("RunStarted", {
        "app": app, "number": 3, "run_id": "r3", "command": ["sh"], "host_id": "ha",
        "release": 1, "detached": True})])
    hosts = {"ha": b"KEY-A", "hb": b"KEY-B"}
    c = Collector(tmp_path, admits=Placed(cluster.dsn(), {"CONTROL"}, lambda: hosts).admits)
    assert c.receive(app, iid, 0, 0, b"forged\n", sender="KEY-B") == (0, 0)
    assert c.receive(app, f"{app}.run.3", 0, 0, b"forged\n", sender="KEY-B") == (0, 0)
    assert c.receive(app, iid, 0, 0, b"forged\n", sender="KEY-C") == (0, 0)
    assert c.receive(app, iid, 0, 0, b"real\n", sender="KEY-A") == (0, 5)
    assert c.receive(app, f"{app}.run.3", 0, 0, b"run\n", sender="KEY-A") == (0, 4)
    assert c.receive(app, f"router.{app}.lb1", 0, 0, b"GET /\n", sender="CONTROL") == (0, 6)
    lines = [t.split(" ", 2)[2] for t in
             (tmp_path / app / "current.log").read_text().splitlines()]
    assert lines == ["real", "run", "GET /"], lines


def test_a_notice_is_the_platforms_line_in_the_apps_log_once(tmp_path: Path) -> None:
    """The add-ons daemon tells an app its database went read-only in its own log: a real
    collector writes each notice once, as the platform's line (`tally[...]`)."""
    import threading

    from agents import notices
    from agents.logs import Collector

    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    stop = threading.Event()
    collector = threading.Thread(target=Collector(tmp_path).run, args=(endpoint, stop))
    collector.start()
    try:
        for text in ("Error D18 (Database size quota exceeded): first", "second\nforged"):
            assert notices.send(endpoint, None, "blog", "addon.postgresql", text)
    finally:
        stop.set()
        collector.join()
    lines = [t.split(" ", 1)[1] for t in
             (tmp_path / "blog" / "current.log").read_text().splitlines()]
    assert lines == [
        "tally[blog.addon.postgresql] Error D18 (Database size quota exceeded): first",
        "tally[blog.addon.postgresql] second\ufffdforged"], lines


def test_a_host_cannot_silence_or_misfile_another_hosts_lines(tmp_path: Path) -> None:
    """The review's case: a compromised host named another host's instance with a huge
    epoch, and the collector then dropped that instance's real lines as old. Marks are
    per sending key now, and a line goes only under the app its instance's name is of."""
    from agents.logs import Collector, names_app

    c = Collector(tmp_path)
    assert c.receive("blog", "blog.1.web.a", 0, 0, b"real 1\n", sender="HOSTA") == (0, 7)
    forged = c.receive("blog", "blog.1.web.a", 10**12, 0, b"forged\n", sender="HOSTB")
    assert forged == (10**12, 7)
    assert c.receive("blog", "blog.1.web.a", 0, 7, b"real 2\n", sender="HOSTA") == (0, 14)
    assert c.receive("shop", "blog.1.web.b", 0, 0, b"misfiled\n", sender="HOSTB") == (0, 0)
    lines = [t.split(" ", 2)[2] for t in
             (tmp_path / "blog" / "current.log").read_text().splitlines()]
    assert "real 1" in lines and "real 2" in lines
    assert not (tmp_path / "shop").exists()
    assert names_app("router.blog.lb1", "blog") and names_app("blog.run.3", "blog")
    assert not names_app("router.blog.lb1", "router-x") and not names_app("blogx.1.web.a", "blog")
