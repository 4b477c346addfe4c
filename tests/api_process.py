"""Helpers for driving the API as clients do, shared by the tests and bench/api.py:
bundles made from in-memory files, and `tally serve api` as a subprocess on a free port."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import time

import requests


def pack_files(files: dict[str, str]) -> bytes:
    """A tar.gz of in-memory files: {"Procfile": "web: ..."}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class ApiProcess:
    """`tally serve api` in a subprocess, stopped by stop()."""

    def __init__(self, env: dict[str, str], port: int, extra: tuple[str, ...] = ()) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tally.cli", "serve", "api", "--bind",
             f"127.0.0.1:{port}", *extra], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the API exited: " + self.proc.stderr.read().decode()[-2000:])
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the API did not answer on {self.url} within {timeout}s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


def project_now(dsn: str) -> None:
    """Bring every view up to the ledger head once, with the projectors' own runtime
    (checkpointed: safe beside a running `tally serve projectors`)."""
    import projectors
    from ledger import Ledger
    from projectors.runtime import Runner, catch_up, connect

    conn = connect(dsn, "views", "tally-api-tests")
    try:
        with Ledger(dsn, notify=False) as ledger:
            runners = [Runner(p, conn) for p in projectors.ALL]
            for runner in runners:
                runner.start()
            catch_up(runners, ledger, ledger.sequence())
    finally:
        conn.close()
