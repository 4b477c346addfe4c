"""Formation sizes: what one instance of a process type may use on its host, named as on
Heroku (`tally scale web=2:standard-2x`). One table read by the API (quotas count memory
by size) and by the host agents (each instance's cgroup limits): a leaf module both import.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 2**20


@dataclass(frozen=True)
class Size:
    name: str
    memory_mb: int
    """The instance's memory limit (all its processes together): past it the kernel kills."""
    pids: int
    """Processes and threads the instance may have at once."""
    cpu_shares: int
    """Its weight for CPU time when the host is busy (cgroup v1 `cpu.shares`; 1024 = one)."""

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb * MiB

    @property
    def disk_mb(self) -> int:
        """What the instance may write (/app, /tmp, /var/tmp together: agents/runtime.py),
        in memory: its files count against `memory_mb` as well, so half of it, and an app
        at its disk limit still has the other half to run in. A tenant's quota of memory
        (api/quotas.py) bounds its disk so."""
        return self.memory_mb // 2


SIZES: dict[str, Size] = {s.name: s for s in (
    Size("basic", 512, 256, 512),
    Size("standard-1x", 512, 256, 1024),
    Size("standard-2x", 1024, 512, 2048),
    Size("performance-m", 2560, 4096, 4096),
    Size("performance-l", 14336, 16384, 8192),
)}
DEFAULT_SIZE = "standard-1x"
"""The size of a process type scaled without one, and of one-off runs."""


def size_of(name: str | None) -> Size:
    """The named size; the default for None or a name this version does not know (an event
    written by a newer API must not stop an older agent)."""
    return SIZES.get(name or DEFAULT_SIZE) or SIZES[DEFAULT_SIZE]
