# Two commands do all set-up on a fresh machine:
#   make demo   - set up, then run the whole pipeline on the bundled teacher (offline, a few minutes)
#   make test   - set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the CPU build first, so that pip does not pull a multi-GB CUDA build for the package's torch range
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[torch,serve,bench,dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/t2r-export demo -o graphs/t2r-teacher --force

test: setup
	$(BIN)/python -m pytest -q

# includes the slow tests (long decodes, the full experiment budget)
test-all: setup
	$(BIN)/python -m pytest -q -m "not gpu and not trt"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
