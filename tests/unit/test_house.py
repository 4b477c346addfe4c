"""The house rules, checked on the source: imports run one way with no cycle, and nothing
outside ledger/ writes SQL against the ledger's tables."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ledger", "projectors", "agents", "balancer", "api", "tally", "migrations")
LAYER = {"ledger": 0, "projectors": 1, "agents": 1, "balancer": 1, "api": 1, "tally": 2}
"""tally -> api, agents, balancer, projectors -> ledger (api may use projectors' readers)."""


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "versions" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every tally module `path` imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def test_no_import_cycle() -> None:
    known = modules()
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            cycle = path[path.index(m):] + [m]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if m in done:
            return
        for n in sorted(graph[m]):
            if not (n == m.rpartition(".")[0] or m == n.rpartition(".")[0]):  # package init
                visit(n, [*path, m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


def test_dependencies_flow_one_way() -> None:
    known = modules()
    wrong = []
    for m, path in known.items():
        top = m.split(".")[0]
        for n in imports(path, known):
            other = n.split(".")[0]
            if top in LAYER and other in LAYER and LAYER[other] > LAYER[top]:
                wrong.append(f"{m} imports {n}")
    assert not wrong, wrong


LEDGER_TABLES = re.compile(r"\b(FROM|JOIN|INTO|UPDATE|TABLE)\s+ledger\.(events|positions)\b")


def test_only_the_ledger_package_reads_the_ledger_tables() -> None:
    found = [f"{m}" for m, path in modules().items()
             if not m.startswith(("ledger", "migrations")) and LEDGER_TABLES.search(
                 "\n".join(line for line in path.read_text().splitlines()
                           if not line.lstrip().startswith("#")))]
    assert not found, f"SQL on ledger.events/positions outside ledger/: {found}"


SCHEMA_SQL = re.compile(r"\b(FROM|JOIN|INTO|UPDATE|TABLE)\s+(ledger|views|stats)\.[a-z_]+")
SCHEMA_OWNERS = {"ledger": ("ledger", "migrations"), "views": ("projectors", "migrations"),
                 "stats": ("agents.stats", "migrations")}
"""Who may write SQL on each schema: the ledger's tables, the views the projectors make and
keep, the samples agents/stats.py writes and reads. Others go through their objects."""


def test_no_package_reads_another_packages_tables() -> None:
    found = []
    for m, path in modules().items():
        code = "\n".join(line for line in path.read_text().splitlines()
                         if not line.lstrip().startswith("#"))
        for match in SCHEMA_SQL.finditer(code):
            if not m.startswith(SCHEMA_OWNERS[match.group(2)]):
                found.append(f"{m}: {match.group(0)}")
    assert not found, found


def test_token_events_are_made_in_one_place() -> None:
    """A TokenIssued event is made only by api/auth.py (token_event): the API's route, `tally
    admin create-user` and `tally up`'s agent tokens all call it."""
    makers = {m for m, p in modules().items() if 'NewEvent("TokenIssued"' in p.read_text()}
    assert makers == {"api.auth"}


def test_configuration_is_read_from_the_environment_in_one_place() -> None:
    """Only tally/config.py looks a setting up in the environment (others hand the whole
    environment on to a child process, which is not reading it); migrations/env.py takes its
    DSN from tally or from Alembic's `-x dsn=`."""
    lookup = re.compile(r"os\.environ(\.get\(|\[)|os\.getenv\(|environ\.get\(")
    readers = {m for m, p in modules().items() if lookup.search(p.read_text())}
    assert readers <= {"tally.config"}, readers


def test_the_cli_loads_only_what_a_command_uses() -> None:
    """Every daemon and every CLI call is a `tally` process (hundreds in the test suite):
    importing the CLI loads no migrations (alembic, SQLAlchemy), no API server (Flask) and
    no HTTP client (requests); the commands that use them import them."""
    import subprocess
    import sys

    heavy = ("alembic", "sqlalchemy", "flask", "requests", "gunicorn", "eventlet")
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, tally.cli; print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    assert not {m.split(".")[0] for m in loaded} & set(heavy)


def test_the_type_checks_name_only_modules_that_exist() -> None:
    """pyproject's mypy overrides say which modules are checked strictly: a module renamed
    or removed must leave them, or the section quietly checks nothing."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    known = modules()
    named = [m for section in config.get("overrides", []) for m in section["module"]]
    assert named and not [m for m in named if m not in known]


def test_the_readmes_layout_places_every_module() -> None:
    """README's layout table names every module of the server packages in its folder's
    row, and names no module that is not there."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):readme.index("\n## ", readme.index("## Layout"))]
    rows = dict(re.findall(r"^\| `([a-z.]+)/` \| (.*) \|$", table, re.M))
    unplaced = []
    for m, path in modules().items():
        top, _, rest = m.partition(".")
        if top == "migrations" or not rest:
            continue
        name = f"{path.parent.name}/" if path.stem == "__init__" else path.stem
        if not re.search(rf"`(\w+/)?{re.escape(name)}(\.py)?`", rows[top]):
            unplaced.append(m)
    for folder in ("bench", "tests"):  # their top-level modules: benchmarks and helpers
        unplaced += [f"{folder}/{path.name}" for path in sorted((ROOT / folder).glob("*.py"))
                     if path.stem != "__init__" and f"`{path.name}`" not in rows[folder]]
    assert not unplaced, f"not in README's layout table: {unplaced}"
    named = {(folder, name) for folder, text in rows.items() if folder in PACKAGES
             for name in re.findall(r"`(\w+(?:/\w+)*)\.py`", text)}
    absent = [f"{folder}/{name}.py" for folder, name in named
              if not any((ROOT / folder).rglob(f"{name}.py"))]
    assert not absent, f"README's layout table names modules that do not exist: {absent}"
