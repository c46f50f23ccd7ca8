# Two commands do all the set-up: `make demo` and `make test` (lint, then the tests). Each creates .venv
# and installs what is missing on first use.
VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

export ALIGN_CACHE_DIR ?= $(CURDIR)/.align/cache
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test bench lint chromium

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[api,worker,dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(VENV)/bin/python examples/service_demo.py

test: lint chromium
	$(VENV)/bin/pytest

# Debian's chromium and chromium-driver for the dashboard's browser tests (tests/e2e/test_dashboard.py and
# tests/services/test_dashboard_browser.py look for them at these paths), installed with apt-get only when
# either is missing; never a downloaded browser. Without apt-get, or not as root, it says what to install.
CHROMIUM     ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
CHROMIUM_PACKAGES := chromium chromium-driver

chromium:
	@test -x $(CHROMIUM) -a -x $(CHROMEDRIVER) && exit 0; \
	missing="$(CHROMIUM) or $(CHROMEDRIVER) is missing (the dashboard's browser tests need both)"; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make chromium: $$missing and there is no apt-get here: install Debian's $(CHROMIUM_PACKAGES)," \
	       "or your system's chromium and its chromedriver at those paths" >&2; exit 1; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "make chromium: $$missing; installing needs root:" \
	       "sudo apt-get install -y $(CHROMIUM_PACKAGES) (or sudo make chromium)" >&2; exit 1; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -q $(CHROMIUM_PACKAGES) || \
	  { apt-get update -q && apt-get install -y -q $(CHROMIUM_PACKAGES); } || \
	  { echo "make chromium: apt-get could not install $(CHROMIUM_PACKAGES) (its messages are above)" >&2; exit 1; }

bench: $(STAMP)
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(VENV)/bin/python bench/train_vs_trl.py --stage sft
	$(VENV)/bin/python bench/train_vs_trl.py --stage dpo
	$(VENV)/bin/python bench/rl_vs_trl.py
	$(VENV)/bin/python bench/rl_vs_trl.py --precision bf16
	$(VENV)/bin/python bench/rl_vs_trl.py --algo rloo
	$(VENV)/bin/python bench/precision.py

# ruff with the rule set in pyproject.toml, and the import contracts (align imports no service, database or
# Ray code; services and workers stay apart). `make test` runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check align services workers migrations tests bench
	$(VENV)/bin/lint-imports
