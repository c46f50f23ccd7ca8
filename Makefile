# Two commands do all the set-up: `make demo` and `make test` (lint, then the tests). Each creates .venv
# and installs what is missing on first use.
VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

export ALIGN_CACHE_DIR ?= $(CURDIR)/.align/cache
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test bench lint

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[api,worker,dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(VENV)/bin/python examples/service_demo.py

test: lint
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(VENV)/bin/python bench/dpo_vs_trl.py
	$(VENV)/bin/python bench/rl_vs_trl.py
	$(VENV)/bin/python bench/rl_vs_trl.py --precision bf16
	$(VENV)/bin/python bench/rl_vs_trl.py --algo rloo
	$(VENV)/bin/python bench/precision.py

# ruff with the rule set in pyproject.toml, and the import contracts (align imports no service, database or
# Ray code; services and workers stay apart). `make test` runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check align services workers tests bench
	$(VENV)/bin/lint-imports
