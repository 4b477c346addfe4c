"""The platform's own hostnames: every app answers at `<app>.<suffix>`, and no custom
domain may fall under that suffix or cover it with a wildcard.

The suffix is a fact in the ledger (`PlatformSuffixSet` on the PLATFORM_STREAM), not a
setting: the routes projector and the API read it from there, so a replay routes as the
platform did then. One rule, here, for both (a second copy is how they would disagree).
"""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT_SUFFIX = "tally.local"
"""Until a PlatformSuffixSet says otherwise (`tally up` sets `localhost`, RFC 6761)."""
PLATFORM_STREAM = "platform-names"
"""The stream of the platform's naming facts."""


def platform_hostname(app: str, suffix: str) -> str:
    """`blog` -> `blog.tally.local`: claimed by the app from its creation to its deletion."""
    return f"{app}.{suffix}"


def _under(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def reserved(domain: str, suffix: str) -> bool:
    """Whether a (normalised) custom domain falls under the platform's suffix, or is a
    wildcard covering it: `x.tally.local`, `tally.local`, `*.tally.local`, `*.local`."""
    if domain.startswith("*."):
        base = domain[2:]
        return _under(base, suffix) or _under(suffix, base)
    return _under(domain, suffix)


def current_suffix(events: Iterable[tuple[str, dict]]) -> str:
    """The suffix after these (type, data) events of the PLATFORM_STREAM."""
    suffix = DEFAULT_SUFFIX
    for type_, data in events:
        if type_ == "PlatformSuffixSet":
            suffix = data["suffix"]
    return suffix
