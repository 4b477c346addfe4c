# tally: `make up` brings the platform up on this machine, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PG_BIN ?= /usr/lib/postgresql/15/bin

.PHONY: install up down test bench bench-quick lint postgres system

# Debian packages the platform and its tests run (one a line, so branches merge cleanly):
# the sandbox (bubblewrap), network rules (nftables), etcd for Patroni, the data tier
# (pgbouncer, haproxy, redis), the balancer's baselines (nginx, wrk) and ACME test server.
APT_PACKAGES := \
	bubblewrap \
	etcd-server \
	haproxy \
	nftables \
	nginx \
	pebble \
	pgbouncer \
	python3-venv \
	redis-server \
	wrk

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Patroni runs as the postgres user, who cannot reach an interpreter under /root (pyenv):
# its own virtualenv on the system Python, beside the project's (ledger/patroni.py).
HA_VENV ?= .venv-ha
$(HA_VENV)/.installed:
	/usr/bin/python3 -m venv $(HA_VENV)
	$(HA_VENV)/bin/pip install -q 'patroni[etcd3]==4.1.5' psycopg2-binary
	touch $@

install: postgres system $(VENV)/.installed $(HA_VENV)/.installed

# Installs only what is missing (dpkg -s), so a prepared machine does not touch apt.
system:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	test -z "$$missing" || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; }

# PostgreSQL 15 server binaries: Debian's package where they are missing.
postgres:
	@test -x $(PG_BIN)/initdb || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }

up: install
	$(VENV)/bin/tally up

down:
	$(VENV)/bin/tally down

# pytest-xdist: TEST_WORKERS sessions side by side, each test file whole on one of them
# (its module fixtures made once), the longest files first (tests/conftest.py). More
# workers than cores pays: most of a test's time is waiting on its subprocesses.
TEST_WORKERS ?= 4
test: install
	$(PY) -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Every benchmark, each printing its table and one JSON line of figures.
bench: install
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

bench-quick: install
	@for b in bench/*.py; do echo "== $$b --quick"; $(PY) $$b --quick || exit 1; done

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
