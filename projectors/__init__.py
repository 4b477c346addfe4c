"""Projectors: events -> views. Every view is derived from the ledger, exactly once per
event, and can be rebuilt, or replayed to any past position, by the same code.

Pure core: projectors/tables.py, projector.py, the view modules (apps, hosts, placements,
instances, routes, backups) and why.py. Shells over PostgreSQL: store.py (load and flush
rows with the checkpoint), runtime.py (the `tally serve projectors` daemon), rebuild.py,
replay.py (state at N, diff) and inspect.py (events, status, why's loader).
"""

from projectors import apps, backups, hosts, instances, placements, routes
from projectors.projector import HandlerFailed, Projector, project, table_owners

ALL: tuple[Projector, ...] = (
    apps.PROJECTOR, hosts.PROJECTOR, placements.PROJECTOR, instances.PROJECTOR,
    routes.PROJECTOR, backups.PROJECTOR,
)
VIEWS: dict[str, Projector] = table_owners(ALL)
"""Public view name -> its projector."""


class UnknownProjector(ValueError):
    """No projector or view by that name."""


def by_name(name: str) -> Projector:
    for p in ALL:
        if p.name == name:
            return p
    raise UnknownProjector(
        f"unknown projector {name!r}; projectors: {', '.join(p.name for p in ALL)}")


def owner_of(view: str) -> Projector:
    try:
        return VIEWS[view]
    except KeyError:
        raise UnknownProjector(
            f"unknown view {view!r}; views: {', '.join(sorted(VIEWS))}") from None


__all__ = ["ALL", "VIEWS", "HandlerFailed", "Projector", "UnknownProjector", "by_name",
           "owner_of", "project"]
