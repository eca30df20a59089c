# Blueshift start-tracking pipeline. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEMO := $(CURDIR)/.demo
DEMO_DAY ?= 2026-11-24
DEMO_DATE ?= 2026-11-25
STANDIN_PORT ?= 8099

export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False

.DEFAULT_GOAL := help
.PHONY: help install warehouses demo test lint typecheck bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	set -o pipefail; $(BIN)/pip install --quiet --upgrade pip 2>&1 | { grep -v "ignored: it is neither" || true; }
	set -o pipefail; $(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt \
	  2>&1 | { grep -v "ignored: it is neither" || true; }
	touch $@

install: $(VENV)/.installed ## Create .venv and install the pinned requirements

# The optional warehouse engines (MySQL/MariaDB, DuckDB) and the SQL parser: the tests need them,
# `make demo` does not. mysqlclient compiles against the MariaDB client library.
$(VENV)/.warehouses: $(VENV)/.installed requirements-warehouses.txt
	@pkg-config --exists libmariadb 2>/dev/null || pkg-config --exists mysqlclient 2>/dev/null || { \
	  echo "The MySQL provider's mysqlclient compiles against the MariaDB/MySQL client library: install it"; \
	  echo "first (Debian/Ubuntu: apt-get install -y libmariadb-dev pkg-config; macOS: brew install"; \
	  echo "mariadb-connector-c pkg-config), then run make again."; exit 1; }
	set -o pipefail; $(BIN)/pip install --quiet -r requirements-warehouses.txt -c constraints.txt \
	  2>&1 | { grep -v "ignored: it is neither" || true; }
	touch $@

warehouses: $(VENV)/.warehouses ## Install the optional warehouse providers and checkers (the tests need them)

demo: install ## Seed a SQLite warehouse, start the stand-in, run the DAG for one day, print the audit
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	@$(BIN)/python sandbox/demo_warehouse.py seed $(DEMO)/warehouse.db --day $(DEMO_DAY)
	@export AIRFLOW_HOME=$(DEMO)/airflow \
	  AIRFLOW_CONN_WAREHOUSE_DEFAULT='{"conn_type": "sqlite", "host": "$(DEMO)/warehouse.db"}' \
	  AIRFLOW_CONN_BLUESHIFT_DEFAULT='{"conn_type": "http", "host": "http://127.0.0.1:$(STANDIN_PORT)", "login": "demo-key"}' \
	  PATH=$(CURDIR)/$(BIN):$$PATH; \
	$(BIN)/python sandbox/blueshift_standin.py --port $(STANDIN_PORT) --api-key demo-key \
	  --fault-rate 0.05 --seed 7 --fixed CUST-REJECT=422 & STANDIN=$$!; \
	trap "kill $$STANDIN 2>/dev/null" EXIT; \
	echo "Migrating the Airflow metadata DB in $(DEMO)/airflow ..."; \
	airflow db migrate > $(DEMO)/migrate.log 2>&1 || { tail -20 $(DEMO)/migrate.log; exit 1; }; \
	echo "Running blueshift_start_tracking for the window [$(DEMO_DAY), $(DEMO_DATE)); log in $(DEMO)/dag_test.log ..."; \
	airflow dags test blueshift_start_tracking $(DEMO_DATE) > $(DEMO)/dag_test.log 2>&1; RC=$$?; \
	echo "DAG run state: $$(grep -oE 'DagRun Finished: .*state=[a-z]+' $(DEMO)/dag_test.log | grep -oE '[a-z]+$$' | tail -1)"; \
	$(BIN)/python sandbox/demo_warehouse.py summary $(DEMO)/warehouse.db; exit $$RC

lint: install ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install ## mypy
	$(BIN)/mypy

test: install warehouses lint typecheck ## Lint, type-check and run the whole pytest suite
	$(BIN)/pytest

bench: install ## Run the benchmarks and print their figures
	$(BIN)/python bench/run.py

clean: ## Remove the venv and all local state
	rm -rf $(VENV) $(DEMO) .bench .pytest_cache .mypy_cache .ruff_cache
