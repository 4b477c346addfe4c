"""What a host keeps on disk: the releases it runs or may soon run again, and nothing of
deleted apps.

Every deploy unpacks a release folder (and, behind an API, downloads its bundle); without
this a host's disk fills with every release ever deployed, and a deleted app would leave
its code, its home folder and its Unix user behind, where Dokku's `apps:destroy` removes
them. Kept per app: the releases its instances here run or are placed to run, its
current and deployed releases, and the KEEP_RECENT newest (a rollback needs no unpack).
Release folders are named by their slug's digest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agents.fleet import App

KEEP_RECENT = 3


@dataclass(frozen=True)
class Cleanup:
    releases: list[tuple[str, str]]
    """(app, digest) release folders and bundles to remove."""
    apps: list[str]
    """Deleted apps to remove entirely: their folders, home and user."""


def plan(on_disk: Mapping[str, set[str]], apps: Mapping[str, App],
         in_use: Mapping[str, set[str]]) -> Cleanup:
    """on_disk: app -> release digests unpacked here (an app with a home but no release
    maps to an empty set); apps: the live apps; in_use: app -> digests of the instances
    placed here or still running here."""
    releases, gone = [], []
    for name, digests in sorted(on_disk.items()):
        app = apps.get(name)
        if app is None:
            if not in_use.get(name):
                gone.append(name)
            continue
        newest = sorted(app.releases, reverse=True)[:KEEP_RECENT]
        keep = {app.releases[n].slug for n in (*newest, app.current_release, app.deployed)
                if n in app.releases and app.releases[n].slug} | in_use.get(name, set())
        releases += [(name, d) for d in sorted(digests - keep)]
    return Cleanup(releases, gone)
