"""schemathesis against /openapi.json of a real API (gunicorn subprocess) over the session's
ledger, as each role (admin, member, agent): examples, coverage, fuzzing and stateful
sequences that follow the spec's links (create an app, then use it). Every operation:
add-ons are made for real (an apps' PostgreSQL cluster made before the run, Redis servers
on the test's ports), a followed log is read until its first event or for a few seconds.
Asserted: every run passes its checks (status codes, content types and bodies as
documented), no request got a 5xx (a documented 503, "unavailable now", aside), stateful
scenarios ran, and every operation was called at least MIN_CALLS times per role (so a run
that tests nothing, or skips what it cannot reach, fails). Bounded by --max-time per role;
the roles run at once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from agents import redisaddon
from agents.addons import ensure_cluster
from api.auth import create_user
from api.routes_views import LOGS_KEEPALIVE_S
from ledger import Ledger
from ledger.tickets import new_key
from tally.config import Config
from tests.api_process import ApiProcess
from tests.conftest import free_port_range, free_ports, tally_env

MIN_CALLS = 3
"""Requests each operation gets from each role's runs, at least."""
MAX_TIME_S = 120
"""Each run stops generating after this long (they all run at once)."""
LOGS_READ_S = LOGS_KEEPALIVE_S + 2
"""How long a run reads GET /apps/{name}/logs?follow=true, an endless text/event-stream
(documented as such), if no event ends it first: longer than the API's keep-alive interval,
as a client's read timeout must be (a silent stream is a read error otherwise)."""
CONFIG = f"""
[[operations]]
include-operation-id = "logs"
request-timeout = {LOGS_READ_S}
max-stream-events = 1
"""
"""A followed stream is closed after its first event, as a client that got what it wanted,
or once LOGS_READ_S have passed."""
RUNS = {"admin-coverage": ("admin", "coverage"),
        "admin": ("admin", "examples,fuzzing,stateful"),
        "member": ("member", "examples,fuzzing,stateful"),
        "agent": ("agent", "examples,fuzzing,stateful")}
"""The coverage phase (boundary values of every parameter) for one role, as it is slow;
fuzzing and stateful sequences for each."""


def _operations(spec: dict[str, Any]) -> dict[tuple[str, str], re.Pattern[str]]:
    """(METHOD, /path/{template}) -> a regex matching its concrete paths."""
    out = {}
    for path, ops in spec["paths"].items():
        rx = re.compile("^" + "/".join("[^/]+" if seg.startswith("{") else re.escape(seg)
                                       for seg in path.split("/")) + "$")
        for method in ops:
            out[(method.upper(), path)] = rx
    return out


def _calls(har: Path, operations: dict[tuple[str, str], re.Pattern[str]]
           ) -> tuple[Counter[tuple[str, str]], list[str]]:
    """Requests per operation in a HAR file, and the server errors (5xx but the documented
503)."""
    counts: Counter[tuple[str, str]] = Counter()
    errors = []
    for entry in json.loads(har.read_text())["log"]["entries"]:
        method = entry["request"]["method"]
        path = urlsplit(entry["request"]["url"]).path
        status = entry["response"]["status"]
        if status >= 500 and status != 503:
            errors.append(f"{status} {method} {path}")
        for (m, template), rx in operations.items():
            if m == method and rx.match(path):
                counts[(m, template)] += 1
                break
    return counts, errors


def _run(st: Path, url: str, token: str, phases: str, out: Path) -> subprocess.Popen:
    out.mkdir()
    # one worker: hypothesis' lambda descriptions are not thread-safe on Python 3.11
    # ("AST constructor recursion depth mismatch" errors inside schemathesis)
    with open(out / "report.txt", "w") as report:
        (out / "schemathesis.toml").write_text(CONFIG)
        return subprocess.Popen(
            [str(st), "--config-file", str(out / "schemathesis.toml"), "run",
             f"{url}/openapi.json", "--max-examples", "5",
             # A documented 503 ("unavailable now, try again") is an answer, not a server
             # error: every other 5xx is counted from the recorded requests (_calls).
             "--checks", "status_code_conformance,content_type_conformance,"
             "response_schema_conformance",
             "--phases", phases, "--seed", "1",
             "--generation-database", "none", "--workers", "1", "--no-color",
             "--max-time", str(MAX_TIME_S), "--request-timeout", "45",
             "--report", "har", "--report-har-path", str(out / "requests.har"),
             "-H", f"Authorization: Bearer {token}"],
            stdout=report, stderr=subprocess.STDOUT, cwd=out,
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""})


def test_schemathesis_as_every_role(cluster: Any, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    with Ledger(cluster.dsn()) as ledger:
        tokens = {"admin": create_user(ledger, f"fuzz-admin-{tag}", "admin"),
                  "member": create_user(ledger, f"fuzz-member-{tag}", "member"),
                  "agent": create_user(ledger, f"fuzz-agent-{tag}", "agent", f"fz{tag}")}
    a, b, proxy, port = free_ports(4)
    low, high = free_port_range(8)
    env = tally_env(cluster, TALLY_RUN_KEY=new_key().hex(), TALLY_APPS_DB_PORTS=f"{a},{b}",
                    TALLY_APPS_DB_PORT=str(proxy), TALLY_APPS_HA="plain",
                    TALLY_REDIS_PORTS=f"{low}-{high}")
    cfg = Config.from_env(env)
    apps = cfg.apps_cluster()
    redis_before = set(redisaddon.apps(cfg.redis_dir))
    api = ApiProcess(env, port)
    try:
        # Made while the API starts: else the first add-on spends the run making it.
        ensure_cluster(apps)
        api.wait_ready()
        # Something to reach as a member: an app of their own (the fuzzer makes more).
        made = requests.post(f"{api.url}/apps", json={"name": f"fz-{tag}"}, timeout=30,
                             headers={"Authorization": f"Bearer {tokens['member']}"})
        assert made.status_code == 201, made.text
        spec = requests.get(f"{api.url}/openapi.json", timeout=30).json()
        st = Path(sys.executable).parent / "st"
        runs = {label: _run(st, api.url, tokens[role], phases, tmp_path / label)
                for label, (role, phases) in RUNS.items()}
        codes = {label: proc.wait(MAX_TIME_S * 4) for label, proc in runs.items()}
    finally:
        api.stop()
        for app in set(redisaddon.apps(cfg.redis_dir)) - redis_before:
            redisaddon.destroy(cfg.redis_dir, app)
        apps.destroy()
    operations = _operations(spec)
    calls: dict[str, Counter[tuple[str, str]]] = {role: Counter() for role in tokens}
    for label, code in codes.items():
        text = (tmp_path / label / "report.txt").read_text()
        if "TALLY_SCHEMATHESIS_REPORT" in os.environ:  # keep the reports where asked
            folder = Path(os.environ["TALLY_SCHEMATHESIS_REPORT"]).parent
            (folder / f"schemathesis-{label}.txt").write_text(text)
        assert code == 0, f"{label}: {text.split('FAILURES', 1)[-1][:6000]}"
        counts, errors = _calls(tmp_path / label / "requests.har", operations)
        assert not errors, f"{label}: server errors {errors[:10]}"
        calls[RUNS[label][0]] += counts
        if "stateful" in RUNS[label][1]:
            scenarios = re.search(r"Scenarios:\s+(\d+)", text)
            assert scenarios and int(scenarios[1]) > 0, f"{label}: no stateful scenario\n{text}"
    for role, counts in calls.items():
        few = sorted(f"{m} {p}: {counts[(m, p)]}" for m, p in operations
                     if counts[(m, p)] < MIN_CALLS)
        assert not few, f"{role}: operations called fewer than {MIN_CALLS} times: {few}"
