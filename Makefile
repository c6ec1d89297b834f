# Starvit data platform. `make demo` and `make test` work on a fresh machine: each creates the
# virtualenv and installs everything it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
MANIFEST := dbt_project/target/manifest.json
DBT_SOURCES := $(shell find dbt_project -path dbt_project/target -prune -o -type f \( -name '*.sql' -o -name '*.yml' -o -name '*.md' -o -name '*.csv' \) -print 2>/dev/null) $(wildcard starvit_assets/clinical/*.py)
PATIENTS ?= 10000

.PHONY: install demo dev test lint typecheck unit bench docs clean stop

install: $(INSTALLED) $(MANIFEST)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(MANIFEST): $(INSTALLED) $(DBT_SOURCES)
	$(BIN)/starvit dbt prepare

demo: install
	$(BIN)/starvit demo

dev: install
	$(BIN)/starvit dev

lint: install
	$(BIN)/ruff check starvit_assets starvit_assets_tests
	$(BIN)/ruff format --check starvit_assets starvit_assets_tests

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q starvit_assets_tests/unit

test: lint typecheck
	$(BIN)/pytest -q -ra

bench: install
	$(BIN)/starvit bench --patients $(PATIENTS) --out bench.json

docs: install
	$(BIN)/starvit dbt docs

stop:
	-$(BIN)/starvit db stop

clean: stop
	rm -rf .starvit dbt_project/target dbt_project/logs
