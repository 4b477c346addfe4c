"""The agent's side of speaking only to the API, without I/O beyond a temp folder: the
desired state turned into the fleet values the agent acts on, and the outbox's order,
persistence and handling of an API that is away or refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agents.api_client import ApiAway, ApiRefused
from agents.desired import fleet_of
from agents.outbox import Outbox
from ledger.relay import host_wakes, topics

SNAPSHOT = {
    "host_id": "h1", "version": 42, "changed": True,
    "placements": [{"instance_id": "blog.2.web.a", "app": "blog", "release": 2,
                    "process_type": "web", "port": 7001}],
    "apps": {"blog": {"current": 3, "deployed": 2, "failed": {"3": "crash loop"},
                      "releases": {"2": {"digest": "d2", "procfile": {"web": "gunicorn a"},
                                         "config_version": 1},
                                   "3": {"digest": "d3", "procfile": {"web": "gunicorn b"},
                                         "config_version": 2}},
                      "configs": {"1": {"A": "1", "B": "2"}, "2": {"B": "3"}}}},
}


def test_the_desired_state_becomes_the_agents_fleet() -> None:
    fleet = fleet_of(SNAPSHOT)
    (p,) = fleet.placements.values()
    assert (p.instance_id, p.host_id, p.port, p.release) == ("blog.2.web.a", "h1", 7001, 2)
    app = fleet.apps["blog"]
    assert app.releases[2].digest == "d2" and app.releases[3].procfile == {"web": "gunicorn b"}
    assert app.deployed == 2 and app.failed == {3: "crash loop"} and app.current_release == 3
    assert app.config_at(1) == {"A": "1", "B": "2"}
    assert app.config_at(2) == {"B": "3"}  # A was unset between the two snapshots
    assert fleet.position == 42


def test_an_agent_wakes_for_its_host_and_the_apps_placed_on_it() -> None:
    wakes = host_wakes("h1", (p.app for p in fleet_of(SNAPSHOT).placements.values()))
    assert wakes == {b"host/h1/", b"app/blog/"}
    # what the relays publish past a placement on h1, one on h10, an unplacement and a
    # rollout of blog, and one of another app; ZeroMQ matches subscriptions by prefix
    published = topics([("h1", "blog", 5), ("h10", "blog", 6), (None, "blog", 7),
                        (None, "other", 8), (None, "blog", 3)])
    assert {t: p for t, p in published.items() if any(t.startswith(w) for w in wakes)} == {
        b"host/h1/": 5, b"app/blog/": 7}


def _item(n: int) -> dict[str, Any]:
    return {"instance_id": f"i{n}", "type": "InstanceStarted", "data": {"pid": n}}


def test_the_outbox_sends_in_order_and_keeps_what_the_api_did_not_take(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.jsonl")
    keys = [box.put(_item(n))["key"] for n in range(4)]
    assert len(set(keys)) == 4
    assert (tmp_path / "outbox.jsonl").stat().st_mode & 0o777 == 0o600  # log tails: private
    sent: list[str] = []

    def away_after_two(item: dict[str, Any]) -> None:
        if len(sent) == 2:
            raise ApiAway("connection refused")
        sent.append(item["key"])

    assert box.flush(away_after_two) == 2
    assert sent == keys[:2] and [i["key"] for i in box.items] == keys[2:]
    assert (tmp_path / "outbox.jsonl").stat().st_mode & 0o777 == 0o600  # rewritten: still
    again = Outbox(tmp_path / "outbox.jsonl")  # a restarted agent finds the rest, same keys
    assert [i["key"] for i in again.items] == keys[2:]
    again.flush(lambda item: sent.append(item["key"]))
    assert sent == keys and len(again) == 0
    assert Outbox(tmp_path / "outbox.jsonl").items == []


def test_a_refused_report_is_dropped_and_does_not_block_the_rest(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.jsonl")
    box.put(_item(1))
    box.put(_item(2))
    sent = []

    def refuse_first(item: dict[str, Any]) -> None:
        if item["instance_id"] == "i1":
            raise ApiRefused("403 not placed here", 403)
        sent.append(item["instance_id"])

    box.flush(refuse_first)
    assert sent == ["i2"] and box.dropped == 1 and len(box) == 0


def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    Outbox(path).put(_item(1))
    with open(path, "a") as f:
        f.write('{"instance_id": "i2", "ty')  # killed mid-write: never sent
    assert [i["instance_id"] for i in Outbox(path).items] == ["i1"]


@pytest.mark.parametrize("url", ["", "ftp://x", "localhost:8000"])
def test_a_bad_api_url_is_refused(url: str) -> None:
    from agents.api_client import HostApi

    with pytest.raises(ValueError, match="must look like"):
        HostApi(url, "tly_x", "h1")
