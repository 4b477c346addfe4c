"""agents/ports.py's pure half: gunicorn commands lose their own binds, others are left."""

from __future__ import annotations

import pytest

from agents.ports import rebind, strip_binds


@pytest.mark.parametrize("command, rebound", [
    ("gunicorn app:app", "gunicorn app:app"),
    ("gunicorn --bind 0.0.0.0:$PORT app:app -w $WEB_CONCURRENCY",
     "gunicorn app:app -w $WEB_CONCURRENCY"),  # the rest as written: the shell expands it
    ("gunicorn -b0.0.0.0:1 --bind=[::]:2 -b 3 app:app", "gunicorn app:app"),
    ("python -m gunicorn -b 0.0.0.0:80 app", "python -m gunicorn app"),
    ("FOO=1 /app/.venv/bin/gunicorn --bind x app:app", "FOO=1 /app/.venv/bin/gunicorn app:app"),
    ("python crash.py", None),  # binds $PORT itself, if it listens
    ("python -m http.server $PORT", None),
    ('gunicorn "unclosed', None),
])
def test_rebind(command: str, rebound: str | None) -> None:
    assert rebind(command) == rebound


def test_an_apps_own_gunicorn_args_lose_their_binds() -> None:
    assert strip_binds("--bind 0.0.0.0:9999 --workers 3 -b [::]:1") == "--workers 3"
