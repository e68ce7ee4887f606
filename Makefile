# Meterline: `make run` (the embedded app) and `make test` (the whole suite) on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test check system-deps migrate seed bench-ingest vendor clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(VENV)/.runtime $@

# Debian packages the tests need (debian-packages.txt), installed when running as root.
system-deps:
	@pkgs="$$(grep -v '^\s*#' debian-packages.txt | xargs)"; \
	if [ -z "$$pkgs" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		missing="$$(for p in $$pkgs; do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done | xargs)"; \
		if [ -n "$$missing" ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		fi; \
	else echo "Not root: make sure these Debian packages are installed: $$pkgs"; fi

migrate: $(VENV)/.runtime
	$(BIN)/python manage.py migrate --noinput

seed: migrate
	$(BIN)/python manage.py setup_schedules
	$(BIN)/python manage.py seed_demo

# The embedded default: SQLite, the ORM broker, demo data, the scheduler, the dev server.
run: seed
	HOST=$(HOST) PORT=$(PORT) BIN=$(BIN) ./scripts/run-embedded.sh

test: $(VENV)/.dev system-deps
	$(BIN)/pytest $(PYTEST_ARGS)

check: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/lint-imports
	$(BIN)/python manage.py makemigrations --check --dry-run

bench-ingest: $(VENV)/.dev
	$(BIN)/python bench/ingest.py

# Re-vendor Chart.js and Pico from npm into static/vendor (pinned, checked; the files are committed).
vendor:
	./scripts/vendor_static.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
