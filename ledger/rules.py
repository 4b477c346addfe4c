"""What an event means, written once for every fold of the ledger.

tally folds the same events in several places, each for a reason of its own: the API
decides on an app's stream (api/state.py) and knows who may do what (api/auth.py), the
placer and the agents see the fleet (agents/fleet.py), the projectors write the views
(projectors/), the API answers agents from the placements (api/hosts.py). Each keeps the
shape its readers need, but what one event changes is the same in all of them, so it is
decided here and nowhere else; tests/unit/test_folds.py feeds one history to every fold and
checks that they agree. Pure functions over plain values; a leaf module beside
ledger/vocabulary.py (which holds the states, liveness and scale rules).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from ledger.vocabulary import RUNNING, InstanceState


def config_after(config: Mapping[str, str], change: Mapping[str, Any]) -> dict[str, str]:
    """A ConfigChanged applied to the config before it: its `unset` keys go, then its
    `set` keys are set (a key both unset and set ends set)."""
    unset = set(change.get("unset", ()))
    out = {k: v for k, v in config.items() if k not in unset}
    out.update(change.get("set", {}))
    return out


def domains_after(domains: Iterable[str], event_type: str, domain: str) -> list[str]:
    """DomainAdded or DomainRemoved applied: a hostname is held once, a new one last."""
    out = [d for d in domains if d != domain]
    if event_type == "DomainAdded":
        out.append(domain)
    return out


def members_after(members: frozenset[str], event_type: str, user: str) -> frozenset[str]:
    """AppMemberAdded or AppMemberRemoved applied to an app's members (the owner is not
    one of them: AppCreated names it, and it cannot be removed)."""
    return members | {user} if event_type == "AppMemberAdded" else members - {user}


OBSERVED: Mapping[str, InstanceState] = {
    "InstanceStarted": InstanceState.STARTED,
    "InstanceHealthy": InstanceState.HEALTHY,
    "InstanceExited": InstanceState.EXITED,
    "InstanceStopped": InstanceState.STOPPED,
}
"""The state each report of a host agent puts its instance in."""


def instance_kept(placed: bool, state: str) -> bool:
    """Whether an instance still has a record: while the placer wants it (placed) or its
    process still runs (it holds its port until its agent stops it). Unplaced and not
    running, it is gone: InstanceUnplaced of a stopped instance, or a report of one the
    placer no longer wants that is not running."""
    return placed or state in RUNNING


HOST_LOST_AFTER: Mapping[str, bool] = {
    "HostRegistered": False,
    "HostHeartbeat": False,
    "HostLost": True,
}
"""Whether a host is lost after each host event: HostLost makes it so until the host is
heard from again (a heartbeat or a new registration brings it back)."""


ROLLOUT_EVENTS = ("ReleaseDeployed", "ReleaseFailed")
DESIRED_EVENTS = ("InstancePlaced", "InstanceUnplaced", "RunStarted", "RunEnded",
                  *ROLLOUT_EVENTS)
"""The events that move a host's desired state (api/hosts.py folds them; the relays wake
the hosts they name, or the hosts of the app they name)."""


def rollout_after(deployed: int | None, failed: Mapping[int, str], event_type: str,
                  data: Mapping[str, Any]) -> tuple[int | None, dict[int, str]]:
    """An app's rollout after one of ROLLOUT_EVENTS: the deployed release (the last one
    whose every wanted instance was healthy; a later release failing leaves it deployed, it
    goes on serving) and the failed releases, each with its reason."""
    if event_type == "ReleaseDeployed":
        return data["release"], dict(failed)
    if event_type == "ReleaseFailed":
        return deployed, {**failed, data["release"]: data.get("reason", "")}
    return deployed, dict(failed)


def release_to_run(current: int, deployed: int | None, failed: Collection[int]) -> int:
    """The release the placer places: the current one, unless it failed and an earlier
    one was deployed (that one goes on serving)."""
    if current in failed and deployed is not None and deployed not in failed:
        return deployed
    return current


def serving_releases(current: int | None, deployed: int | None,
                     failed: Collection[int]) -> set[int]:
    """The releases whose healthy web instances take traffic: the current one unless it
    failed, and the deployed one (during a rolling deploy both serve); a failed current one
    if nothing else can (the placer keeps it placed then: nothing older to serve instead).
    `release_to_run` is always one of them."""
    serving = {r for r in (current, deployed) if r is not None and r not in failed}
    return serving or ({current} if current is not None else set())


ADDON_DROP_EVENTS = ("AddonCreated", "AddonDestroyed", "AddonDropped")
"""The events that say whether an add-on's service should still exist."""


def undropped_after(undropped: Mapping[str, str], event_type: str,
                    data: Mapping[str, Any]) -> dict[str, str]:
    """An app's add-ons destroyed in the ledger whose service may still exist (add-on name
    -> kind): AddonDestroyed adds one; AddonDropped (its service gone) or an AddonCreated of
    that name (a new one, made once the old was gone) removes it."""
    out = {k: v for k, v in undropped.items() if k != data.get("addon")}
    if event_type == "AddonDestroyed":
        out[data["addon"]] = data["kind"]
    return out
