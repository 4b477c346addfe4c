"""App uids: handed out in order from a range, each once."""

from __future__ import annotations

import pytest

from ledger.uids import NoUidLeft, next_uid


def test_the_first_uid_then_the_one_after_the_last() -> None:
    assert next_uid(None, 200_000, 200_002) == 200_000
    assert next_uid(200_000, 200_000, 200_002) == 200_001


def test_the_range_full() -> None:
    with pytest.raises(NoUidLeft, match="TALLY_APP_UIDS"):
        next_uid(200_002, 200_000, 200_002)
