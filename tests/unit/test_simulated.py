"""The simulated host's timing (agents/simulated.py), without I/O."""

from __future__ import annotations

from agents.simulated import beat_after


def test_a_late_beat_is_not_followed_by_the_ones_it_missed() -> None:
    assert beat_after(10.0, 10.2, 5.0) == 15.0  # on time: one interval on
    # 12 s late (the API was slow): the next beat keeps the host's phase, no burst of
    # the two it missed (a simulator that caught up would offer more the slower the API)
    assert beat_after(10.0, 27.0, 5.0) == 30.0
    assert beat_after(10.0, 15.0, 5.0) == 15.0
