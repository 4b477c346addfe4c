"""Run a WSGI app under gunicorn in the foreground (`tally serve api`, bench/api.py)."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication


class Gunicorn(BaseApplication):
    """gunicorn with options given in code, not read from the command line."""

    def __init__(self, app: Any, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self.application


def options(bind: str, workers: int = 2, threads: int = 4) -> dict[str, Any]:
    """The one gunicorn configuration the API runs with (and the benchmark's baseline)."""
    return {"bind": bind, "workers": workers, "threads": threads,
            "worker_class": "gthread" if threads > 1 else "sync", "timeout": 60,
            "graceful_timeout": 5, "accesslog": None, "loglevel": "warning"}
