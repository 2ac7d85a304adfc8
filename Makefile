# gencli: `make run` installs and trains the default model; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision are pinned in pyproject.toml; pip's quiet mode hides the resolver chatter.
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: install run test test-fast test-slow lint bench clean

install: $(BIN)/gencli

$(BIN)/gencli: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import gencli, torch, torchvision, lightning, hydra, torchmetrics" # fail here if the install did not
	touch $(BIN)/gencli

# The default job: a VAE on the embedded 8x8 digits, on CPU (about a minute on 2 cores).
run: install
	$(BIN)/gencli train

# The whole suite, slow end-to-end runs included (what CI runs), in TEST_WORKERS processes; each
# test file stays on one worker (--dist loadfile) so its module-scoped training runs happen once.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Unit and fast CLI tests only.
test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint: install
	$(BIN)/ruff check src tests scripts

clean:
	rm -rf outputs multirun .pytest_cache
