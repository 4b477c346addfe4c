"""schemathesis against /openapi.json of a real API (gunicorn subprocess) over the session's
ledger: generated valid and invalid requests, as an admin; no 5xx, and every response
conforms to the documented schema and status codes. Bounded examples to stay quick."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from api.auth import create_user
from ledger import Ledger
from tests.api_process import ApiProcess
from tests.conftest import free_ports, tally_env


def test_schemathesis_finds_no_server_error_nor_schema_violation(cluster: Any,
                                                                 tmp_path: Path) -> None:
    with Ledger(cluster.dsn()) as ledger:
        token = create_user(ledger, f"fuzz-{uuid.uuid4().hex[:6]}", "admin")
    api = ApiProcess(tally_env(cluster), free_ports(1)[0])
    try:
        api.wait_ready()
        st = Path(sys.executable).parent / "st"
        # one worker: hypothesis' lambda descriptions are not thread-safe on Python 3.11
        # ("AST constructor recursion depth mismatch" errors inside schemathesis)
        r = subprocess.run(
            [str(st), "run", f"{api.url}/openapi.json", "--max-examples", "8",
             "--checks", "not_a_server_error,status_code_conformance,"
             "content_type_conformance,response_schema_conformance",
             "--phases", "examples,coverage,fuzzing", "--seed", "1",
             "--generation-database", "none", "--workers", "1", "--no-color",
             "--max-time", "35", "--request-timeout", "45",
             "-H", f"Authorization: Bearer {token}"],
            capture_output=True, text=True, timeout=150, cwd=tmp_path,
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    finally:
        api.stop()
    report = Path(os.environ.get("TALLY_SCHEMATHESIS_REPORT", tmp_path / "report.txt"))
    report.write_text(r.stdout + r.stderr)
    failures = r.stdout.split("FAILURES", 1)[-1]
    assert r.returncode == 0, f"full report in {report}:\n{failures[:8000]}"
