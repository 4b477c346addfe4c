"""agents/dbroute.py's pure half: which node the stable port is translated to, as nft."""

from __future__ import annotations

from pathlib import Path

from agents.dbroute import Node, Route, choose, listeners, owned_by, render, table_name

ROUTE = Route(table_name(5445), "127.0.0.1", 5445,
              (Node("a", 5443, 8008), Node("b", 5444, 8009)), "tally_appsdb")


def test_the_table_translates_the_stable_port_to_the_primary_or_to_nothing() -> None:
    script = render(ROUTE, 5444)
    lines = [line.strip() for line in script.splitlines()]
    assert lines[:3] == ["table ip tally_appsdb_5445 {}", "delete table ip tally_appsdb_5445",
                         "table ip tally_appsdb_5445 {"]
    assert "type nat hook output priority -100; policy accept;" in lines
    assert "ip daddr 127.0.0.1 tcp dport 5445 dnat to 127.0.0.1:5444" in lines
    assert "dnat" not in render(ROUTE, None)  # no primary: nothing is translated
    assert Route.from_json(ROUTE.to_json()) == ROUTE


def test_only_a_node_whose_ports_are_the_clusters_and_that_says_primary_is_chosen() -> None:
    everyone = set(range(5000, 9000))
    assert choose(ROUTE, lambda n: n.name == "b", everyone.__contains__) == 5444
    assert choose(ROUTE, lambda n: False, everyone.__contains__) is None
    # Two primaries (one of them an impostor answering 200): trust neither.
    assert choose(ROUTE, lambda n: True, everyone.__contains__) is None
    # Node a's Patroni is down and an app took its REST port, answering 200: not chosen.
    assert choose(ROUTE, lambda n: True, (everyone - {8008}).__contains__) == 5444
    # An app took a stopped node's PostgreSQL port: not chosen either.
    assert choose(ROUTE, lambda n: n.name == "a", (everyone - {5443}).__contains__) is None


def test_listeners_are_read_from_proc_with_their_owners(tmp_path: Path) -> None:
    tcp = tmp_path / "tcp"
    tcp.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        "   0: 0100007F:1548 00000000:0000 0A 00000000:00000000 00:00000000 00000000   "
        "108        0 1 1 0 100 0 0 10 0\n"  # 127.0.0.1:5448 LISTEN, uid 108
        "   1: 00000000:1F48 00000000:0000 0A 00000000:00000000 00:00000000 00000000  "
        "1001        0 2 1 0 100 0 0 10 0\n"  # 0.0.0.0:8008 LISTEN, uid 1001
        "   2: 0100007F:1548 0100007F:9C40 01 00000000:00000000 00:00000000 00000000   "
        "108        0 3 1 0 100 0 0 10 0\n")  # established: not a listener
    tcp6 = tmp_path / "tcp6"
    tcp6.write_text(
        "  sl  local_address                         remote_address                        "
        "st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        "   0: 00000000000000000000000000000000:1549 00000000000000000000000000000000:0000 "
        "0A 00000000:00000000 00:00000000 00000000  1002        0 4 1 0 100 0 0 10 0\n")
    found = listeners({str(tcp): "4", str(tcp6): "6"})
    assert found == {("127.0.0.1", 5448): {108}, ("0.0.0.0", 8008): {1001},
                     ("::", 5449): {1002}}
    owned = owned_by(108, "127.0.0.1", found)
    assert owned(5448)
    assert not owned(8008)  # an app's wildcard listener takes 127.0.0.1:8008
    assert not owned(5449)  # [::] too (dual stack)
    assert not owned(5450)  # nobody listens
