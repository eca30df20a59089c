# Blueshift start-tracking pipeline. `make help` lists the targets.
SHELL := /bin/bash
# The supported Pythons, newest first. PYTHON=/path/to/python3.X picks one; otherwise the newest of
# python3.13 ... python3.10 on PATH that runs. Each has its own lock, constraints-3.X.txt.
SUPPORTED := 3.13 3.12 3.11 3.10
SUPPORTED_RANGE := $(firstword $(sort $(SUPPORTED))) to $(lastword $(sort $(SUPPORTED)))
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := $(CURDIR)/.demo
DEMO_DAY ?= 2026-11-24
DEMO_DATE ?= 2026-11-25
STANDIN_PORT ?= 8099

# "3.X 3.X.Y prefix" of the interpreter running it: the venv is rebuilt when this changes.
PY_ID_CODE := import sys; print("%d.%d" % sys.version_info[:2], "%d.%d.%d" % sys.version_info[:3], sys.base_prefix)
ifeq ($(strip $(PYTHON)),)
override PYTHON := $(shell for v in $(SUPPORTED); do \
  python$$v -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$$v')" >/dev/null 2>&1 && { echo python$$v; break; }; \
done)
PY_ERROR := No supported Python found: none of $(addprefix python,$(SUPPORTED)) on PATH runs. This project \
  supports Python $(SUPPORTED_RANGE): install one, or name it with PYTHON=/path/to/python3.X
endif
PY_ID := $(if $(PYTHON),$(shell $(PYTHON) -c '$(PY_ID_CODE)' 2>/dev/null))
PY_VERSION := $(word 1,$(PY_ID))
ifneq ($(PY_ID),)
PY_ERROR := PYTHON=$(PYTHON) is Python $(word 2,$(PY_ID)): this project supports Python $(SUPPORTED_RANGE); \
  name one with PYTHON=/path/to/python3.X
ifneq ($(filter $(PY_VERSION),$(SUPPORTED)),)
PY_ERROR :=
endif
else ifneq ($(PYTHON),)
PY_ERROR := PYTHON=$(PYTHON) does not run. This project supports Python $(SUPPORTED_RANGE); name one with \
  PYTHON=/path/to/python3.X
endif
LOCK := constraints-$(PY_VERSION).txt

export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False

# pip's notes about the machine's extra (empty) package locations, dropped from the output.
QUIET_PIP := 2>&1 | { grep -v "ignored: it is neither" || true; }

.DEFAULT_GOAL := help
.PHONY: help python install warehouses demo test unit lint typecheck bench screenshots lock clean year-ahead FORCE

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

python: ## Print the Python that make would use, its lock and its venv
	@$(if $(PY_ERROR),echo "$(PY_ERROR)" >&2; exit 1)
	@echo "$(PYTHON): Python $(word 2,$(PY_ID)), lock $(LOCK), venv $(VENV)"

# The interpreter the venv was built with. When another one is chosen now, the venv is rebuilt; a venv
# made before this stamp existed is kept when its Python is the chosen one.
$(VENV)/.python: FORCE
	@$(if $(PY_ERROR),echo "$(PY_ERROR)" >&2; exit 1)
	@if [ "$$(cat $@ 2>/dev/null)" != "$(PY_ID)" ]; then \
	  if [ "$$($(BIN)/python -c '$(PY_ID_CODE)' 2>/dev/null)" = "$(PY_ID)" ]; then \
	    echo "$(PY_ID)" > $@ && touch -r $(VENV)/pyvenv.cfg $@; \
	  elif [ -e $(VENV) ] && [ ! -e $(VENV)/pyvenv.cfg ]; then \
	    echo "$(VENV) exists and is not a venv: remove it or choose another VENV=" >&2; exit 1; \
	  else \
	    [ ! -e $(VENV) ] || echo "$(VENV) was built with $$($(BIN)/python -V 2>&1 || echo another Python):" \
	      "rebuilding it with $(PYTHON) (Python $(word 2,$(PY_ID)))"; \
	    rm -rf $(VENV) && mkdir -p $(VENV) && echo "$(PY_ID)" > $@; \
	  fi; \
	fi

FORCE:

$(VENV)/.installed: $(VENV)/.python requirements.txt requirements-dev.txt $(LOCK)
	@echo "Installing the requirements into $(VENV) with $(PYTHON) (Python $(word 2,$(PY_ID))) and $(LOCK) ..."
	$(PYTHON) -m venv $(VENV)
	set -o pipefail; $(BIN)/pip install --quiet --upgrade pip $(QUIET_PIP)
	set -o pipefail; $(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt -c $(LOCK) $(QUIET_PIP)
	touch $@

install: $(VENV)/.installed ## Create the venv (.venv, or VENV=...) and install the pinned requirements

# mysqlclient, the MySQL provider's driver, compiles against the MariaDB/MySQL client library.
define need-mariadb-client
@pkg-config --exists libmariadb 2>/dev/null || pkg-config --exists mysqlclient 2>/dev/null || { \
  echo "The MySQL provider's mysqlclient compiles against the MariaDB/MySQL client library: install it"; \
  echo "first (Debian/Ubuntu: apt-get install -y libmariadb-dev pkg-config; macOS: brew install"; \
  echo "mariadb-connector-c pkg-config), then run make again."; exit 1; }
endef

# The optional warehouse engines (MySQL/MariaDB, DuckDB) and the SQL parser: the tests need them,
# `make demo` does not.
$(VENV)/.warehouses: $(VENV)/.installed requirements-warehouses.txt
	$(need-mariadb-client)
	set -o pipefail; $(BIN)/pip install --quiet -r requirements-warehouses.txt -c $(LOCK) $(QUIET_PIP)
	touch $@

warehouses: $(VENV)/.warehouses ## Install the optional warehouse providers and checkers (the tests need them)

demo: install ## Seed a SQLite warehouse, start the stand-in, run the DAG for one day, print the audit
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	@$(BIN)/python sandbox/demo_warehouse.py seed $(DEMO)/warehouse.db --day $(DEMO_DAY)
	@export AIRFLOW_HOME=$(DEMO)/airflow \
	  AIRFLOW_CONN_WAREHOUSE_DEFAULT='{"conn_type": "sqlite", "host": "$(DEMO)/warehouse.db"}' \
	  AIRFLOW_CONN_BLUESHIFT_DEFAULT='{"conn_type": "http", "host": "http://127.0.0.1:$(STANDIN_PORT)", "login": "demo-key"}' \
	  PATH=$(abspath $(BIN)):$$PATH; \
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

unit: install warehouses ## Run the pytest suite without the end-to-end tests (tests/e2e)
	$(BIN)/pytest --ignore=tests/e2e

year-ahead: ## Run the whole suite with the clock moved a year ahead (libfaketime; OFFSET=+400d ARGS="tests/e2e -q")
	sandbox/year_ahead.sh $(or $(OFFSET),+365d) $(or $(ARGS),-q)

bench: install ## Run the benchmarks and print their figures
	$(BIN)/python bench/run.py

# The browser test clicks through the Airflow UI in Debian's Chromium (apt-get install -y chromium) and
# writes the README's figures, under stable names, into docs/screenshots.
screenshots: install ## Regenerate docs/screenshots/*.png: the UI test in a headless Chromium (needs chromium)
	BLUESHIFT_TEST_SCREENSHOTS_DIR=$(CURDIR)/docs/screenshots $(BIN)/pytest tests/e2e/test_ui_browser.py

# Each interpreter of LOCK_PYTHONS gets a throw-away venv, the pinned top-level requirements of all
# three files without any lock, and its `pip freeze` written to constraints-3.X.txt.
LOCK_PYTHONS ?= $(addprefix python,$(SUPPORTED))
lock: ## Re-resolve constraints-3.X.txt for each supported Python (LOCK_PYTHONS="python3.10 ..." picks them)
	$(need-mariadb-client)
	@set -euo pipefail; for py in $(LOCK_PYTHONS); do \
	  v=$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || { \
	    echo "make lock: $$py does not run; name the interpreters with LOCK_PYTHONS=\"/path/to/python3.X ...\"" >&2; exit 1; }; \
	  case " $(SUPPORTED) " in *" $$v "*) ;; *) echo "make lock: $$py is Python $$v, not one of $(SUPPORTED)" >&2; exit 1;; esac; \
	  tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	  echo "Resolving constraints-$$v.txt with $$py in $$tmp ..."; \
	  $$py -m venv $$tmp/venv; \
	  $$tmp/venv/bin/pip install --quiet --upgrade pip $(QUIET_PIP); \
	  $$tmp/venv/bin/pip install --quiet -r requirements.txt -r requirements-dev.txt -r requirements-warehouses.txt $(QUIET_PIP); \
	  $$tmp/venv/bin/pip freeze > $$tmp/freeze; \
	  if grep -vE '^[A-Za-z0-9._-]+==[^ ]+$$' $$tmp/freeze; then echo "make lock: pip freeze gave lines that are no pin (above)" >&2; exit 1; fi; \
	  mv $$tmp/freeze constraints-$$v.txt; rm -rf "$$tmp"; \
	  echo "constraints-$$v.txt: $$(wc -l < constraints-$$v.txt) pins"; \
	done

clean: ## Remove the venv (.venv, or VENV=...) and all local state
	rm -rf $(VENV) $(DEMO) .bench .pytest_cache .mypy_cache .ruff_cache
