# PlantSync Edge: the two commands a newcomer needs are `make demo` and `make test`.
# Every target sets up .venv (and mosquitto) first, so a fresh Debian machine needs nothing else.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench faults soak setup mosquitto clean

demo: setup
	$(BIN)/plantsync demo --config config/demo.yaml

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/run.py

# Long fault runs (kill -9 twenty times, broker/OPC UA/Modbus outages, ERP down five minutes
# then 429s, disk budget, corrupt database); each prints one JSON line of figures.
faults: setup
	$(BIN)/pytest -q -s -m slow

# An hour at plant load; prints a JSON report (memory, files, threads; lost = 0).
soak: setup
	$(BIN)/python tests/soak.py

setup: $(STAMP) mosquitto

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

clean:
	rm -rf $(VENV) data schemas .pytest_cache .mypy_cache .ruff_cache *.egg-info
