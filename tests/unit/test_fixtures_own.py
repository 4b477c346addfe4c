"""The tests' own fixtures (tests/conftest.py): what one session hands out is its own, so
pytest-xdist's workers and the ledgers of one run never share a port or a uid block."""

from __future__ import annotations

import pytest

from tests import conftest


def test_a_port_is_not_handed_again_while_fresh_ones_are_left() -> None:
    low, high = conftest.free_port_range(40)
    others = conftest.free_ports(300)
    assert len(set(others)) == 300
    assert not set(others) & set(range(low, high + 1))
    assert all(p in conftest.PORTS for p in [*others, low, high])


def test_uid_blocks_are_the_workers_own_and_never_drawn_twice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw2")
    blocks = [conftest.uid_block() for _ in range(2000)]
    firsts = [int(b.partition("-")[0]) for b in blocks]
    assert len(set(firsts)) == 2000
    assert {f // 1000 % 4 for f in firsts} == {2}
    assert all(int(b.partition("-")[2]) == f + 999 for b, f in zip(blocks, firsts, strict=True))
