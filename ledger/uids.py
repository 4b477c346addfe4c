"""Apps' Unix uids: handed out from a range, in order, each once for ever.

Every allocation is an `AppUidAllocated` event on UID_STREAM, appended at the version read,
so two API workers never hand out one uid twice; a deleted app's uid is never handed out
again, so files it left anywhere never belong to a later app (they are removed with its
user anyway, agents/users.py). A leaf: the API allocates, the agents create the user.
"""

from __future__ import annotations

UID_STREAM = "uids-apps"
DEFAULT_RANGE = (200_000, 299_999)
"""Above the system's and people's uids, and the usual subordinate ranges' first block."""


class NoUidLeft(Exception):
    """Every uid of the range has been handed out."""


def next_uid(highest: int | None, first: int, end: int) -> int:
    """The uid after the highest one of the range ever handed out (the range's first if
    none was). Uids outside the range (handed out under an earlier one) cannot collide."""
    uid = first if highest is None else max(highest + 1, first)
    if uid > end:
        raise NoUidLeft(f"every app uid of {first}-{end} has been handed out "
                        "(TALLY_APP_UIDS sets the range)")
    return uid


def build_uid(app_uid: int, first: int, end: int) -> int:
    """The uid an app's builds run as: the app's uid moved into the range just above the
    apps' (same offset), so it is never an app's uid, never another app's build's, and, as
    the app's, never handed out again."""
    return app_uid + (end - first + 1)
