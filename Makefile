# Two commands matter: `make demo` (the main job, end to end on real data) and `make test`.
# Both create .venv from requirements.lock when it is missing or older than the lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data/marketplace
# Catalogue of `make up`: sqlite (one gateway) or postgres (a local PostgreSQL in run/postgres, two gateways).
DB ?= sqlite
# Absolute, so every tool and test resolves it the same way whatever its working directory.
override DATA := $(abspath $(DATA))
export DATA

.PHONY: venv lint test test-all demo protos lock up down status bench-quick compose-check swarm-check clean

$(VENV)/.installed: requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	@touch $@

venv: $(VENV)/.installed

# ruff (rules in ruff.toml) before the tests: a lint finding or an unformatted file fails `make test`.
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest

test-all: venv
	$(PY) -m pytest -m ""

demo: venv
	$(PY) -m scripts.demo --data "$(DATA)"

protos: venv
	$(PY) -m scripts.gen_protos

lock: venv
	$(PY) -m pip install --quiet -r requirements.in
	{ echo "# Fully pinned environment for the whole repo (pip freeze of requirements.in). Regenerate: make lock"; \
	  $(PY) -m pip freeze; } > requirements.lock

up: venv
	$(PY) -m scripts.stack up --db $(DB)

down: venv
	$(PY) -m scripts.stack down

status: venv
	$(PY) -m scripts.stack status

bench-quick: venv
	for b in accuracy embedder indexer gateway search_quality reliability; do \
	  $(PY) -m benchmarks.$$b --quick || exit 1; done

compose-check: venv
	bash scripts/compose_check.sh

# opt-in, root: the deploy/swarm stack on a single-node Docker Swarm under faults
swarm-check: venv
	bash scripts/swarm_check.sh

clean:
	rm -rf build run
