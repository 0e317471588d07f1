# PlantSync Edge: the two commands a newcomer needs are `make demo` and `make test`.
# Every target sets up .venv (and mosquitto) first, so a fresh Debian machine needs nothing else.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench faults soak fuzz mutate setup mosquitto peers npm mbpoll socat clean

demo: setup
	$(BIN)/plantsync demo --config config/demo.yaml

# The hub of many plants (README: Beyond one plant): 3 nats-server nodes, the ERP simulator,
# hub init, a relay and two simulated plants; prints what arrives until every event has.
.PHONY: demo-hub
demo-hub: setup
	$(BIN)/python -m simulators.hub_demo

# The tests mostly wait on real processes, brokers and sockets, not on the CPU: four workers
# (pytest-xdist) take the suite from about 11 minutes to about 4 on 2 cores. TEST_WORKERS=0 runs
# it in one process.
TEST_WORKERS ?= 4
test: setup
	PLANTSYNC_REQUIRE_PEERS=1 $(BIN)/pytest -q -n $(TEST_WORKERS)

# While editing: the unit tests only (no child process, no broker, no server; those are marked
# `integration` and left to make test), a quarter of the Hypothesis examples, two workers. Needs
# only the venv. A unit test that starts a process fails here (PLANTSYNC_UNIT_ONLY).
test-fast: $(STAMP)
	PLANTSYNC_UNIT_ONLY=1 PLANTSYNC_MODEL_EXAMPLES=15 PLANTSYNC_FUZZ_EXAMPLES=0.25 \
		$(BIN)/pytest -q -n 2 -p no:cacheprovider -m 'not integration and not slow'

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/run.py

# Long fault runs (kill -9 twenty times, broker/OPC UA/Modbus outages, ERP down five minutes
# then 429s, disk budget, corrupt database); each prints one JSON line of figures.
# FAULT_SCALE=0.1 shrinks the outages (the five-minute ERP outage becomes 30 s).
FAULT_SCALE ?= 1
faults: setup
	PLANTSYNC_FAULT_SCALE=$(FAULT_SCALE) $(BIN)/pytest -q -s -m slow

# An hour at plant load (SOAK_ARGS="--duration 300" for a short one); prints a JSON report
# (memory, open files, threads; lost = 0) and fails if a target does.
SOAK_ARGS ?=
soak: setup
	$(BIN)/python tests/soak.py $(SOAK_ARGS)

# A longer Hypothesis hunt than make test's.
fuzz: setup
	PLANTSYNC_FUZZ_EXAMPLES=20 $(BIN)/pytest -q tests/test_fuzz.py

# Mutation testing of the core (outbox, rules, forwarder engine and outcomes, SAP profile) with
# the fast tests as the killer set ([tool.mutmut] in pyproject.toml); long on 2 cores (about an
# hour). Prints one JSON line per module (killed, survived, score, revision); the survivors'
# diffs go to mutants/survivors.txt. MUTATE_ARGS="buffer.outbox*" runs one module.
MUTATE_ARGS ?=
mutate: setup
	rm -rf mutants && mkdir mutants && git rev-parse --short HEAD > mutants/REVISION
	PLANTSYNC_MODEL_EXAMPLES=15 $(BIN)/mutmut run --max-children 2 $(MUTATE_ARGS) > mutants.log 2>&1 || { tail -c 2000 mutants.log; exit 1; }
	$(BIN)/python tests/mutation_report.py

setup: $(STAMP) mosquitto peers socat

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# A Debian package the tests need, by the command it provides: installed as root (with
# apt-get), otherwise a message saying how. $(1) command, $(2) package, $(3) run after an install.
define debian_package
	@if command -v $(1) >/dev/null 2>&1 || test -x /usr/sbin/$(1); then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing $(2) (Debian package)"; \
		apt-get install -y -q $(2) >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q $(2) >/dev/null; }; \
		$(or $(3),:); \
	else \
		echo "$(1) is not installed. Install it with: sudo apt-get install $(2)"; \
		exit 1; \
	fi
endef

# The tests start their own mosquitto broker on a free port; the packaged service stays off.
mosquitto:
	$(call debian_package,mosquitto,mosquitto,systemctl disable --now mosquitto >/dev/null 2>&1 || true)

# Independent peers from npm (tests/peers/package.json, its lock file committed), installed
# into tests/peers/node_modules; node and npm come from Debian when missing.
peers: tests/peers/node_modules/.installed mbpoll

npm:
	$(call debian_package,npm,nodejs npm)

tests/peers/node_modules/.installed: tests/peers/package.json tests/peers/package-lock.json | npm
	cd tests/peers && npm ci --omit=optional --no-audit --no-fund --silent
	touch $@

# mbpoll (Debian) reads the PLC simulator's register map as an independent Modbus client.
mbpoll:
	$(call debian_package,mbpoll,mbpoll)

# The serial RTU test runs the driver over a real serial line: a socat pty pair.
socat:
	$(call debian_package,socat,socat)

clean:
	rm -rf $(VENV) tests/peers/node_modules data schemas mutants mutants.log .pytest_cache .mypy_cache .ruff_cache *.egg-info
