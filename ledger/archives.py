"""The guard every tar.gz the platform unpacks goes through: uploaded bundles (the API, then
each agent again) and built slugs (the builder). A leaf module so there is one rule.

A tar.gz of zeros shrinks a thousandfold: 1 MiB uploaded became 1 GiB on a host. So beyond
a count of entries and an unpacked size (the app's quota, 2 GiB at most), what an archive
unpacks to may be at most MAX_RATIO times its compressed size once past RATIO_FLOOR (small
archives of text and tar headers legitimately compress well). Entries are read header by
header, so a bomb is stopped before it is all decompressed.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

MAX_ENTRIES = 50_000
"""Entries an archive may hold: a small tar.gz can carry millions of empty headers."""
MAX_UNPACKED_BYTES = 2 << 30
"""What one release may unpack to on a host, whatever its quota says."""
MAX_RATIO = 100
"""Unpacked bytes per compressed byte (source code and wheels: 3-10)."""
RATIO_FLOOR = 16 << 20
"""Below this many unpacked bytes the ratio is not checked."""


class ArchiveRefused(ValueError):
    """The archive must not be unpacked; the message says which limit it passes."""


def guarded(tar: tarfile.TarFile, compressed_bytes: int,
            max_unpacked: int = MAX_UNPACKED_BYTES) -> Iterator[tarfile.TarInfo]:
    """The archive's entries, one by one, raising ArchiveRefused as soon as they pass
    MAX_ENTRIES, `max_unpacked` (capped at MAX_UNPACKED_BYTES) or MAX_RATIO."""
    limit = min(max_unpacked, MAX_UNPACKED_BYTES)
    unpacked = 0
    for entries, member in enumerate(tar, start=1):
        unpacked += max(member.size, 0)
        check(entries, unpacked, compressed_bytes, limit)
        yield member


def check(entries: int, unpacked: int, compressed: int, limit: int) -> None:
    """Refuse an archive of `compressed` bytes whose first `entries` entries unpack to
    `unpacked` bytes, if that is already too much."""
    if entries > MAX_ENTRIES:
        raise ArchiveRefused(f"more than {MAX_ENTRIES} entries")
    if unpacked > limit:
        raise ArchiveRefused(f"it unpacks to more than {limit // 2**20} MiB (the app's "
                             f"unpacked-size limit)")
    if unpacked > RATIO_FLOOR and unpacked > MAX_RATIO * max(compressed, 1):
        raise ArchiveRefused(f"it unpacks to over {MAX_RATIO} times its compressed size "
                             f"({unpacked // 2**20} MiB from {compressed // 1024} KiB so far): "
                             "a compression bomb")
