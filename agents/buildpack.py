"""What a build does, inside the sandbox (agents/sandbox.py), as Heroku's Python buildpack
does it. Run there by the system's Python with the standard library only: it imports
nothing of tally and is handed the app at /app, its build cache at /cache.

1. the interpreter: `.python-version` or `runtime.txt` (major.minor) if this machine has
   it, else a build error naming those it has;
2. `bin/pre_compile`;
3. a virtualenv at /app/.venv (a fixed path: the slug runs at /app on every host), restored
   from the cache when the interpreter and the requirement files are unchanged, then
   `uv sync` (uv.lock), `poetry install` (poetry.lock), `pip install -r requirements.txt`
   (any pip syntax: `-e .`, `-r`, `-f`, local paths), or `pip install .` (pyproject.toml or
   setup.py only). pip's cache (downloads and built wheels) is the app's, in /cache;
4. `manage.py collectstatic --noinput` for a Django project, unless DISABLE_COLLECTSTATIC;
5. `bin/post_compile`.
Exit status 0: /app is the slug. Otherwise the last line says why.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

APP = Path("/app")
CACHE = Path("/cache")
VENV = APP / ".venv"
PIP_WHEELS = Path("/usr/share/python-wheels")
LOCKS = ("requirements.txt", "uv.lock", "poetry.lock", "pyproject.toml", "setup.py",
         "setup.cfg")


class BuildError(Exception):
    """The build cannot go on; the message is the user's to read."""


def say(message: str) -> None:
    print(f"-----> {message}", flush=True)


def run(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    print(f"       $ {' '.join(argv)}", flush=True)
    code = subprocess.call(argv, cwd=APP, env=env or os.environ.copy())
    if code != 0:
        raise BuildError(f"{what} failed (exit status {code})")


def versions() -> list[str]:
    """The Python versions this machine (and so every host) has, e.g. ['3.11']."""
    found = {m.group(1) for p in Path("/usr/bin").glob("python3.*")
             if (m := re.fullmatch(r"python(3\.\d+)", p.name))}
    return sorted(found, key=lambda v: [int(x) for x in v.split(".")])


def interpreter() -> str:
    """The interpreter the app asks for, or the system's python3."""
    for name, pattern in ((".python-version", r"\s*(?:python-?)?(3\.\d+)(?:\.\d+)?\s*"),
                          ("runtime.txt", r"\s*python-(3\.\d+)(?:\.\d+)?\s*")):
        path = APP / name
        if not path.is_file():
            continue
        text = path.read_text(errors="replace").strip().splitlines()
        first = text[0] if text else ""
        match = re.fullmatch(pattern, first)
        have = ", ".join(versions()) or "none"
        if not match:
            raise BuildError(f"{name} says {first[:40]!r}: expected a version like 3.11 "
                             f"(the hosts have Python {have})")
        wanted = match.group(1)
        if wanted not in versions():
            raise BuildError(f"Python {wanted} (asked for in {name}) is not on the hosts; "
                             f"they have Python {have}")
        say(f"Using Python {wanted} (from {name})")
        return f"/usr/bin/python{wanted}"
    say(f"Using Python {sys.version_info.major}.{sys.version_info.minor} (the hosts' "
        f"default; pin one in .python-version)")
    return "/usr/bin/python3"


def hook(name: str, env: dict[str, str]) -> None:
    path = APP / "bin" / name
    if path.is_file():
        say(f"Running bin/{name}")
        run(["/bin/bash", str(path)], f"bin/{name}", env)


def cache_key(python: str) -> str:
    h = hashlib.sha256(os.path.realpath(python).encode())
    for name in LOCKS:
        path = APP / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"-"))
    return h.hexdigest()


def pip_command() -> list[str]:
    """pip run from the system's wheel against the virtualenv (no pip inside the slug);
    the virtualenv's own pip where there is no such wheel."""
    wheels = sorted(PIP_WHEELS.glob("pip-*.whl"))
    if wheels and not (VENV / "bin" / "pip").exists():
        return [str(VENV / "bin" / "python"), f"{wheels[-1]}/pip"]
    return [str(VENV / "bin" / "python"), "-m", "pip"]


def virtualenv(python: str, key: str) -> bool:
    """/app/.venv, from the cache when `key` matches. True if restored."""
    cached = CACHE / "venv"
    if (cached / ".tally-key").is_file() and (cached / ".tally-key").read_text() == key:
        say("Restoring the virtualenv from the build cache (requirements unchanged)")
        shutil.copytree(cached, VENV, symlinks=True)
        return True
    if VENV.exists():
        raise BuildError(".venv is in the app's files: leave it out of the bundle "
                         "(.slugignore) and list requirements instead")
    has_wheel = any(PIP_WHEELS.glob("pip-*.whl"))
    say("Creating the virtualenv at /app/.venv")
    run([python, "-m", "venv", *(["--without-pip"] if has_wheel else []), str(VENV)],
        "creating the virtualenv")
    return False


def tool(name: str, env: dict[str, str]) -> Path:
    """A build tool (uv, poetry) from the index, in a virtualenv of its own in the cache."""
    home = CACHE / "tools" / name
    exe = home / "bin" / name
    if not exe.exists():
        say(f"Installing {name} (build tool) from the package index")
        shutil.rmtree(home, ignore_errors=True)
        run(["/usr/bin/python3", "-m", "venv", str(home)], f"creating {name}'s virtualenv")
        run([str(home / "bin" / "python"), "-m", "pip", "install", "-q", name],
            f"installing {name}", env)
    return exe


def tls(env: dict[str, str]) -> dict[str, str]:
    """The system's certificates for the tools that are not pip (uv, Poetry): pip's own
    setting, else Debian's bundle. Without it uv trusts only its built-in roots."""
    cert = env.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    if not Path(cert).is_file():
        return {}
    return {"SSL_CERT_FILE": cert, "REQUESTS_CA_BUNDLE": cert, "UV_NATIVE_TLS": "1"}


def settled(path: Path) -> bool:
    """Does requirements.txt name only what its own text pins down (names and versions,
    `-e .`)? Then a virtualenv restored for the same text needs no pip run. A local path,
    URL, option or nested file (`-r`, `-f ./dists`, `./pkg`) may change without the text
    changing: pip runs."""
    for raw in path.read_text(errors="replace").splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#") or line in ("-e .", "--editable ."):
            continue
        if line.startswith("-") or "/" in line or line.startswith(".") or ":" in line:
            return False
    return True


def install(python: str, env: dict[str, str]) -> None:
    key = cache_key(python)
    restored = virtualenv(python, key)
    requirements = APP / "requirements.txt"
    if (restored and requirements.is_file() and not (APP / "uv.lock").is_file()
            and not (APP / "poetry.lock").is_file() and settled(requirements)):
        say("Requirements unchanged since the cached build: nothing to install")
        return
    pip = [*pip_command(), "install", "--no-input", "--progress-bar", "off",
           "--no-warn-script-location"]
    if (APP / "uv.lock").is_file():
        say("Installing dependencies with uv (uv.lock)")
        uv = tool("uv", env)
        run([str(uv), "sync", "--frozen", "--no-dev"], "uv sync",
            {**env, **tls(env), "UV_PROJECT_ENVIRONMENT": str(VENV), "UV_PYTHON": python,
             "UV_CACHE_DIR": str(CACHE / "uv"), "UV_LINK_MODE": "copy"})
    elif (APP / "poetry.lock").is_file():
        say("Installing dependencies with Poetry (poetry.lock)")
        poetry = tool("poetry", env)
        run([str(poetry), "install", "--only", "main", "--no-interaction"], "poetry install",
            {**env, **tls(env), "POETRY_VIRTUALENVS_CREATE": "false", "VIRTUAL_ENV": str(VENV),
             "POETRY_CACHE_DIR": str(CACHE / "poetry")})
    elif (APP / "requirements.txt").is_file():
        say("Installing requirements with pip")
        run([*pip, "-r", "requirements.txt"], "pip install -r requirements.txt", env)
    elif (APP / "pyproject.toml").is_file() or (APP / "setup.py").is_file():
        say("Installing the app itself with pip (pyproject.toml / setup.py)")
        run([*pip, "."], "pip install .", env)
    else:
        say("No requirements.txt, pyproject.toml, uv.lock or poetry.lock: nothing to install")
    if not restored:
        save(key)


def save(key: str) -> None:
    """The virtualenv into the cache, for the next build with the same requirements."""
    fresh, cached = CACHE / "venv.new", CACHE / "venv"
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(VENV, fresh, symlinks=True)
    (fresh / ".tally-key").write_text(key)
    shutil.rmtree(cached, ignore_errors=True)
    fresh.rename(cached)


def collectstatic(env: dict[str, str]) -> None:
    if not (APP / "manage.py").is_file() or env.get("DISABLE_COLLECTSTATIC"):
        return
    python = str(VENV / "bin" / "python")
    if subprocess.call([python, "-c", "import django"], cwd=APP, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) != 0:
        return
    say("$ python manage.py collectstatic --noinput (set DISABLE_COLLECTSTATIC=1 to skip)")
    run([python, "manage.py", "collectstatic", "--noinput"], "collectstatic", env)


def main() -> int:
    env = {**os.environ, "VIRTUAL_ENV": str(VENV), "PIP_CACHE_DIR": str(CACHE / "pip"),
           "PATH": f"{VENV}/bin:/usr/local/bin:/usr/bin:/bin"}
    try:
        python = interpreter()
        hook("pre_compile", env)
        install(python, env)
        collectstatic(env)
        hook("post_compile", env)
    except BuildError as exc:
        print(f" !     {exc}", flush=True)
        return 1
    say("Build succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
