# Two commands on a fresh machine: `make run` and `make test`. Each installs what is missing first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin/llamagen-gateway
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install system-deps run test lint demo-models bench clean-var

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Debian packages the tests drive: Chromium (dashboard browser tests) and Docker Compose (compose validation).
system-deps:
	@if [ ! -x /usr/bin/chromium ] || ! command -v docker-compose >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium docker-compose; \
	  else echo "install chromium and docker-compose (apt-get) to run the browser and compose tests"; fi; \
	fi

run: install
	$(BIN) migrate
	$(BIN) dev-setup
	$(BIN) serve --host $(HOST) --port $(PORT)

test: install system-deps
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

demo-models: install
	$(PY) -m generator.demo all

bench: install
	$(PY) bench/sampler.py
	$(PY) bench/screening.py
	$(PY) bench/audit.py
	$(PY) bench/dashboard.py
	$(PY) bench/e2e.py

clean-var:
	rm -rf var
