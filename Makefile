# rc-apps-worker: the commands the README gives. Everything runs from .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install lint test test-fast app-test demo bench services services-stop clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: install
	$(BIN)/ruff check worker handlers tests bench scripts
	$(BIN)/ruff format --check worker handlers tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

# Starts the broker and PostgreSQL it needs (or uses KAFKA_BOOTSTRAP_SERVERS), then runs all.
test: lint services app-test
	$(BIN)/pytest --cov --cov-report=term $(PYTEST_ARGS)

# Pure units only: no broker, no PostgreSQL.
test-fast: install
	$(BIN)/pytest -m "not kafka and not postgres and not slow" $(PYTEST_ARGS)

# The Rocket.Chat App (rocketchat-app/): its tests, then the package Rocket.Chat installs.
app-test:
	cd rocketchat-app && npm ci --no-audit --no-fund && npm test && npm run package

services:
	bash docker/local/kafka.sh start
	bash docker/local/postgres.sh start

services-stop:
	-bash docker/local/kafka.sh stop
	-bash docker/local/postgres.sh stop

demo: install
	$(BIN)/python scripts/demo.py

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage rc-worker.db*
