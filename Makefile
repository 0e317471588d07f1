# PlantSync Edge: the two commands a newcomer needs are `make demo` and `make test`.
# Every target sets up .venv (and mosquitto) first, so a fresh Debian machine needs nothing else.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench faults soak fuzz mutate setup mosquitto peers mbpoll socat clean

demo: setup
	$(BIN)/plantsync demo --config config/demo.yaml

test: setup
	PLANTSYNC_REQUIRE_PEERS=1 $(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
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

# The tests start their own mosquitto broker on a free port; it must be installed.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing mosquitto (Debian package)"; \
		apt-get install -y -q mosquitto >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q mosquitto >/dev/null; }; \
		systemctl disable --now mosquitto >/dev/null 2>&1 || true; \
	else \
		echo "mosquitto is not installed. Install it with: sudo apt-get install mosquitto"; \
		exit 1; \
	fi

# Independent peers from npm (tests/peers/package.json, its lock file committed), installed
# into tests/peers/node_modules; node and npm come from Debian when missing.
peers: tests/peers/node_modules/.installed mbpoll

tests/peers/node_modules/.installed: tests/peers/package.json tests/peers/package-lock.json
	@if ! command -v npm >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "Installing nodejs and npm (Debian packages)"; \
			apt-get install -y -q nodejs npm >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null && apt-get install -y -q nodejs npm >/dev/null; }; \
		else \
			echo "npm is not installed. Install it with: sudo apt-get install nodejs npm"; \
			exit 1; \
		fi; \
	fi
	cd tests/peers && npm ci --omit=optional --no-audit --no-fund --silent
	touch $@

# mbpoll (Debian) reads the PLC simulator's register map as an independent Modbus client.
mbpoll:
	@if command -v mbpoll >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing mbpoll (Debian package)"; \
		apt-get install -y -q mbpoll >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q mbpoll >/dev/null; }; \
	else \
		echo "mbpoll is not installed. Install it with: sudo apt-get install mbpoll"; \
		exit 1; \
	fi

# The serial RTU test runs the driver over a real serial line: a socat pty pair.
socat:
	@if command -v socat >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing socat (Debian package)"; \
		apt-get install -y -q socat >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q socat >/dev/null; }; \
	else \
		echo "socat is not installed. Install it with: sudo apt-get install socat"; \
		exit 1; \
	fi

clean:
	rm -rf $(VENV) tests/peers/node_modules data schemas mutants mutants.log .pytest_cache .mypy_cache .ruff_cache *.egg-info
