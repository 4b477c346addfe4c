"""agents/netrules.py's pure half: which ports an app may reach on its host, as nft rules."""

from __future__ import annotations

import os

import pytest

from agents.netrules import Reach, addon_ports, reach_of, render, stale, table_name


def test_addon_ports_are_the_local_ports_where_the_apps_addons_run() -> None:
    places = ["127.0.0.1:5445", "localhost:6390", "10.0.0.7:6379", "[::1]:7000", "junk",
              "127.0.0.1:x"]
    services = frozenset({5445, 6390, 6379, 7000})
    assert addon_ports(places, allowed=services) == {5445, 6390, 7000}
    assert addon_ports(["10.0.0.5:7000"], address="10.0.0.5", allowed=services) == {7000}


def test_a_place_opens_no_port_that_is_not_an_add_on_service() -> None:
    """Even a place recorded wrong opens neither the ledger's port, an agent's control
    port nor another tenant's backend: only the platform's add-on ports count."""
    places = ["127.0.0.1:5433", "localhost:39001", "127.0.0.1:5445"]
    assert addon_ports(places, allowed=frozenset({5445})) == {5445}
    assert addon_ports(places) == set()


def test_each_app_reaches_its_instances_and_addons_only() -> None:
    instances = [("blog", 7001), ("blog", 7002), ("shop", 7003), ("gone", 7004)]
    addons = {"blog": ["127.0.0.1:5445"], "shop": []}
    reach = reach_of(instances, addons, {"blog": 1001, "shop": 1002, "idle": 1003},
                     "127.0.0.1", frozenset({5445}))
    assert sorted(reach, key=lambda r: r.uid) == [
        Reach(1001, frozenset({7001, 7002, 5445})), Reach(1002, frozenset({7003})),
        Reach(1003, frozenset())]  # an app with only one-off runs here: nothing of its own


def test_rules_reject_the_rest_of_this_host_per_uid_and_replace_the_table() -> None:
    script = render("tally_h1", [Reach(1001, frozenset({7001})), Reach(1001, frozenset({5443})),
                                 Reach(1002, frozenset())], [9125])
    lines = [line.strip() for line in script.splitlines()]
    assert lines[:3] == ["table inet tally_h1 {}", "delete table inet tally_h1",
                         "table inet tally_h1 {"]
    assert "ct state established,related accept" in lines
    # by the port asked for: the apps' database's stable port is translated to a node's
    assert ("meta skuid 1001 fib daddr type local meta l4proto { tcp, udp } ct original "
            "proto-dst { 53, 5443, 7001, 9125 } accept") in lines
    assert "meta skuid 1001 fib daddr type local reject" in lines
    assert "meta skuid 1002 fib daddr type local reject" in lines
    assert lines.index("meta skuid 1002 fib daddr type local reject") > lines.index(
        "meta skuid 1001 fib daddr type local reject")
    assert render("t", []) == render("t", [])  # the same state, the same script: not reapplied


def test_table_names_are_nft_identifiers_with_the_agents_pid() -> None:
    assert table_name("tally-h-1.x-0a1b2c3d", 42) == "tally_h_1_x_0a1b2c3d_p42"


def test_stale_tables_are_dead_agents_and_this_agents_earlier_ones() -> None:
    mine = table_name("tally-h1-aaaa", 100)
    tables = [mine, table_name("tally-h1-aaaa", 90), table_name("tally-h2-bbbb", 80),
              table_name("tally-h3-cccc", 70), "filter", "tally_builds",
              "tally_builds_0a1b2c3d_p60"]  # a builder's (dead or not): its own to clear
    assert stale(tables, mine, alive=lambda pid: pid == 70) == [
        "tally_h1_aaaa_p90", "tally_h2_bbbb_p80"]


def test_tally_up_says_when_a_host_lacks_nft(monkeypatch: pytest.MonkeyPatch) -> None:
    from agents import netrules
    from tally import platform

    if os.geteuid() != 0:
        pytest.skip("not root: the warning is about root, not nft")
    assert not [w for w in platform.unconfined() if "network reach" in w]  # this machine
    # A machine without nft cannot exist here: PATH lookups are faked to find nothing.
    monkeypatch.setattr(netrules.shutil, "which", lambda name: None)
    assert [w for w in platform.unconfined() if "network reach" in w] == [
        "  WARNING network reach: nft is not installed (Debian package nftables): apps can "
        "connect to other apps' ports and the platform's on this host"]


def test_the_range_is_reached_at_the_agents_address_from_this_host_or_named_clients() -> None:
    from agents.netrules import Backends

    script = render("t", [Reach(1001, frozenset({7001}))], (), Backends(
        "127.0.0.1", 7000, 7009, {7001: 1001, 7002: 1002}, ("10.0.0.0/8",)))
    lines = [line.strip() for line in script.splitlines()]
    inbound = lines[lines.index("chain input {"):]
    assert inbound[2:] == [
        "ct state established,related accept",
        "meta nfproto ipv6 tcp dport 7000-7009 reject with tcp reset",
        "ip daddr != 127.0.0.1 tcp dport 7000-7009 reject with tcp reset",
        "fib saddr type local tcp dport 7000-7009 accept",
        "ip saddr { 10.0.0.0/8 } tcp dport 7000-7009 accept",
        "tcp dport 7000-7009 reject with tcp reset", "}", "}"]


def test_only_the_placed_apps_listener_answers_from_an_instance_port() -> None:
    """A SYN-ACK from port 7001 leaves only from a socket uid 1001 or the agent (root,
    who hands gunicorn its socket) made; the rule comes before `established` (a SYN-ACK
    is a reply)."""
    from agents.netrules import Backends

    script = render("t", [], (), Backends("127.0.0.1", 7000, 7009, {7001: 1001}))
    lines = [line.strip() for line in script.splitlines()]
    guard = "tcp sport 7001 tcp flags & (syn | ack) == syn | ack meta skuid != { 0, 1001 } drop"
    assert lines.index(guard) < lines.index("ct state established,related accept")
    assert "daddr" not in render("t", [], (), Backends("h1.example", 7000, 7009)).split(
        "chain input")[1]  # a host name: no address rule, never a script nft refuses
