"""What `tally deploy` uploads: the app folder as Heroku would take it.

In a git work tree: the files git tracks (as `git push heroku` sends them), plus nothing
else. Otherwise: the folder, minus what never belongs in a slug (VCS folders, virtualenvs,
caches, `.env` files, local databases). Either way `.slugignore` (one pattern a line, `#`
comments; `name`, `dir/`, `*.glob`, `path/*`) leaves more out, as on Heroku.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import subprocess
import tarfile
from pathlib import Path

from tally.client import ClientError

NEVER = {".git", ".hg", ".svn", ".venv", "venv", "env", "__pycache__", ".mypy_cache",
         ".pytest_cache", ".ruff_cache", ".tox", "node_modules", ".idea", ".vscode"}
"""Folders left out outside git (a virtualenv is rebuilt by the build, never uploaded)."""
SECRET_LIKE = ("*.sqlite", "*.sqlite3", "*.db", ".env", ".env.*", "*.pyc", ".DS_Store")
"""Files left out outside git: secrets and local databases stay on the laptop."""


def files_of(folder: Path) -> list[str]:
    """Relative paths to upload, sorted."""
    tracked = _git_files(folder)
    if tracked is not None:
        names = [n for n in tracked if (folder / n).is_file() or (folder / n).is_symlink()]
    else:
        names = []
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if NEVER & set(rel.parts[:-1] if path.is_file() else rel.parts):
                continue
            if path.is_dir() and not path.is_symlink():
                continue
            if any(fnmatch.fnmatch(rel.name, p) for p in SECRET_LIKE):
                continue
            names.append(str(rel))
    ignore = _slugignore(folder)
    return sorted(n for n in names if not _ignored(n, ignore))


def _git_files(folder: Path) -> list[str] | None:
    """Files git tracks under `folder` (None when it is not in a git work tree)."""
    try:
        proc = subprocess.run(["git", "-C", str(folder), "ls-files", "-z", "--cached",
                               "--", "."], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return [n for n in proc.stdout.decode("utf-8", "surrogateescape").split("\0") if n]


def _slugignore(folder: Path) -> list[str]:
    path = folder / ".slugignore"
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text(errors="replace").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _ignored(name: str, patterns: list[str]) -> bool:
    parts = name.split("/")
    for p in patterns:
        p = p.lstrip("/")
        if p.endswith("/"):
            if p.rstrip("/") in ["/".join(parts[:i]) for i in range(1, len(parts))] or \
                    p.rstrip("/") in parts[:-1]:
                return True
        elif fnmatch.fnmatch(name, p) or fnmatch.fnmatch(parts[-1], p) or \
                any(fnmatch.fnmatch("/".join(parts[:i]), p) for i in range(1, len(parts))):
            return True
    return False


def pack(folder: Path) -> tuple[bytes, int]:
    """The bundle (tar.gz) and how many files it holds."""
    if not (folder / "Procfile").is_file():
        raise ClientError(f"{folder} has no Procfile (e.g. `web: gunicorn app:app`)")
    names = files_of(folder)
    if "Procfile" not in names:
        raise ClientError("the Procfile is left out (not tracked by git, or in .slugignore)")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w") as tar:
        for name in names:
            tar.add(folder / name, arcname=name, recursive=False)
    return buf.getvalue(), len(names)


def size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"
