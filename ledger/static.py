"""An app's static files declaration, `static.json` beside its Procfile: URL prefixes
(ending in `/`) mapped to folders of the app, `{"/static/": "static"}`. The API checks it
when a bundle is uploaded (a deploy with a bad one is refused with the reason); the
balancers read it from the slug to serve those files themselves (balancer/static.py)."""

from __future__ import annotations

import json
import posixpath

DECLARATION = "static.json"


class StaticRefused(ValueError):
    """A slug or declaration the balancer will not serve files from; the message says
    why."""


def declaration(raw: bytes) -> dict[str, str]:
    """`static.json` -> {URL prefix: folder}; StaticRefused if it is not one."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise StaticRefused(f"{DECLARATION} is not JSON: {exc}") from None
    except RecursionError:  # nested deeper than the parser goes: not a declaration
        raise StaticRefused(f"{DECLARATION} is nested too deeply") from None
    if not isinstance(doc, dict) or not doc:
        raise StaticRefused(f'{DECLARATION} must map URL prefixes to folders: '
                            f'{{"/static/": "static"}}')
    out = {}
    for prefix, folder in doc.items():
        if not (isinstance(prefix, str) and prefix.startswith("/") and prefix.endswith("/")
                and isinstance(folder, str) and folder):
            raise StaticRefused(f"{DECLARATION}: {prefix!r} -> {folder!r}: prefixes start and "
                                f"end with /, folders are names")
        clean = posixpath.normpath(folder.strip("/"))
        if clean.startswith("..") or clean == ".":
            raise StaticRefused(f"{DECLARATION}: folder {folder!r} is not inside the app")
        out[prefix] = clean
    return out
