# gencli: `make run` installs and trains the default model; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision are pinned in pyproject.toml; pip's quiet mode hides the resolver chatter.
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: install run test test-fast test-slow test-all lint bench clean

install: $(BIN)/gencli

$(BIN)/gencli: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import gencli, torch, torchvision, lightning, hydra, torchmetrics" # fail here if the install did not
	touch $(BIN)/gencli

# The default job: a VAE on the embedded 8x8 digits, on CPU (about a minute on 2 cores).
run: install
	$(BIN)/gencli train

# The test suite, in TEST_WORKERS processes; each test file stays on one worker (--dist loadfile) so its
# module-scoped training runs happen once. A bare pytest leaves out the end-to-end runs marked slow (tests/conftest.py):
# `make test` takes a few minutes on 2 cores, `make test-slow` runs the slow ones, `make test-all` both (CI: .ci/run).
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The end-to-end runs: train -> sample -> eval for every family, DDP, sweeps, kill and resume.
test-slow: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m slow

test-all: test test-slow

# (the old name of `make test`)
test-fast: test

lint: install
	$(BIN)/ruff check src tests scripts

clean:
	rm -rf outputs multirun .pytest_cache
