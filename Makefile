# Two commands on a fresh machine: `make demo` and `make test`. Everything else is set-up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench test-deps clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, from the local CPU wheel: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev,serve,kserve]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/persia-inc demo

test-deps:
	bash infra/install-test-deps.sh

test: $(STAMP) test-deps
	$(BIN)/ruff check .
	tools/check-layers   # import-linter: arrows point one way; mypy over the library packages
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	tools/check-layers

bench: $(STAMP)  ## every benchmark, one after the other (about 10 minutes; starts its own Ceph)
	for b in packet_codec embedding_server producer loader inference; do \
	  $(BIN)/python bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
