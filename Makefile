# Daily commands. `make help` lists them. Prerequisites (README.md, Quickstart): `make dev` needs Python 3.11+ and Node.js; `make test` also git, chromium, docker-compose, root, PostgreSQL and Redis on 127.0.0.1 (.ci/run installs and starts them).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROXY  := node_modules/.bin/configurable-http-proxy
# checkov (the security scan of deploy/kubernetes and the Dockerfile) pins its own versions of
# many libraries: it lives in a venv of its own, not in the service's.
CHECKOV_VENV := .venv-checkov
CHECKOV := $(CHECKOV_VENV)/bin/checkov

.DEFAULT_GOAL := help
.PHONY: help install sandbox-tools dev test test-unit test-integration lint fmt migrate bench mutation compose-check clean

help: ## list the daily commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

$(CHECKOV): Makefile
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet 'checkov==3.3.30'
	touch $@

$(PROXY): package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

# Sessions and builds run in bubblewrap boxes; where it cannot be installed (not root), `make dev`
# runs unsandboxed and says so, and the shipped Hub config refuses to start.
sandbox-tools:
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -q && apt-get install -y -q bubblewrap; } || \
	  echo "note: bubblewrap is not installed; sessions cannot be sandboxed here"; }

install: $(STAMP) $(PROXY) sandbox-tools ## create .venv and install Python, Node and sandbox dependencies

dev: install ## run the whole local stack (Hub + proxy + app + worker + beat) on :8000
	$(BIN)/hublaunch dev --port $${PORT:-8000}

# The two suites run side by side: the integration tests mostly wait on real processes (Hubs,
# servers, restarts), the unit tests use the CPU; one after the other took 30 min on a slow day.
# The unit suite's report follows the integration suite's; either failing fails the target.
test: install $(CHECKOV) lint ## lint, then every test (unit + integration against real Hub, Redis, PostgreSQL)
	@log=$$(mktemp); \
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS) > $$log 2>&1 & unit=$$!; \
	$(BIN)/pytest -q tests/integration $(PYTEST_ARGS); integration=$$?; \
	wait $$unit; units=$$?; \
	echo "--- tests/unit (ran alongside) ---"; cat $$log; rm -f $$log; \
	echo "tests/integration: exit $$integration; tests/unit: exit $$units"; \
	[ $$integration -eq 0 ] && [ $$units -eq 0 ]

test-unit: install $(CHECKOV) ## only the fast unit tests
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

test-integration: install ## only the integration tests
	$(BIN)/pytest -q tests/integration $(PYTEST_ARGS)

lint: install ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install ## format and auto-fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

migrate: install ## apply migrations to HUBLAUNCH_DATABASE_URL
	$(BIN)/hublaunch migrate

bench: install ## run the benchmarks (figures go in docs/benchmarks.md)
	$(BIN)/python -m bench.launch_overhead

compose-check: ## validate docker-compose.yml (placeholder secrets; nothing is started)
	@command -v docker-compose >/dev/null || { echo "install docker-compose (apt-get install docker-compose)"; exit 1; }
	POSTGRES_PASSWORD=x REDIS_PASSWORD=x HUBLAUNCH_HUB_API_TOKEN=x HUBLAUNCH_SECRET_KEY=x \
	  CONFIGPROXY_AUTH_TOKEN=x DOCKER_GID=0 docker-compose config -q

# mutmut lives in a venv of its own: it pulls in setproctitle, which makes Celery overwrite its
# processes' environment, and the integration tests read that environment.
MUTATION_VENV := .venv-mutation

mutation: install ## mutation testing of the state machine, cleanup pass and intake (docs/mutation.md)
	@test -x $(MUTATION_VENV)/bin/mutmut || { $(PYTHON) -m venv $(MUTATION_VENV) && \
	  $(MUTATION_VENV)/bin/pip install --quiet -e '.[test]' mutmut==3.8.1; }
	rm -rf mutants
	$(MUTATION_VENV)/bin/mutmut run --max-children 2
	$(MUTATION_VENV)/bin/mutmut results

clean: ## remove the venv, node_modules and local state
	rm -rf $(VENV) $(MUTATION_VENV) $(CHECKOV_VENV) mutants node_modules .hublaunch .pytest_cache .mypy_cache .ruff_cache test-artifacts
