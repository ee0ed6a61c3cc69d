# memwatch: the two commands of the README, and their parts.
#
#   make demo   set up .venv, build, record samples/train.py, query the trace
#   make test   set up, lint, and run every Rust and Python test on CPython 3.11, 3.12, 3.13
#
# Builds go to $(CARGO_TARGET_DIR), by default outside the clone so that a
# fresh clone on the same machine reuses them. Nothing else is needed: each
# target creates what it uses.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

export CARGO_TARGET_DIR ?= $(HOME)/.cache/memwatch/target
export CARGO_TERM_COLOR ?= never
PYENV_ROOT ?= $(HOME)/.pyenv

PYTHON_VERSIONS := 3.11 3.12 3.13

# The interpreter for version $(1): pyenv's newest 3.X, else python3.X on PATH.
find_python = $(or $(lastword $(sort $(wildcard $(PYENV_ROOT)/versions/$(1).*/bin/python$(1)))),$(shell command -v python$(1) 2>/dev/null))

# The venv of version $(1); 3.11 is also the demo's .venv.
venv = $(if $(filter 3.11,$(1)),.venv,.venv-$(1))

.PHONY: help demo test lint rust-test py-test $(addprefix py-test-,$(PYTHON_VERSIONS)) browser clean

help:
	@echo "make demo   build, record samples/train.py and query the trace (sets up .venv)"
	@echo "make test   lint and run every test on CPython $(PYTHON_VERSIONS)"

# --- virtual environments -------------------------------------------------

# venv-rule VERSION: creates the venv with the test tools (tests/requirements.txt,
# and tests/requirements-VERSION.txt where there is one), once.
define venv-rule
$(call venv,$(1))/.tools: pyproject.toml tests/requirements.txt $(wildcard tests/requirements-$(1).txt)
	@py="$(call find_python,$(1))"; \
	if [ -z "$$$$py" ]; then echo "make: CPython $(1) not found (looked in $(PYENV_ROOT)/versions and on PATH); install it with 'pyenv install $(1)'" >&2; exit 1; fi; \
	echo "--- setting up $(call venv,$(1)) with $$$$py"; \
	"$$$$py" -m venv --clear $(call venv,$(1)); \
	$(call venv,$(1))/bin/python -m pip install -q --disable-pip-version-check -r tests/requirements.txt $(addprefix -r ,$(wildcard tests/requirements-$(1).txt))
	@touch $$@
endef
$(foreach v,$(PYTHON_VERSIONS),$(eval $(call venv-rule,$(v))))

# install VERSION: builds the package (the same way `pip install .` does)
# and installs it into the venv; cargo makes this quick when nothing changed.
define install
	@echo "--- pip install . into $(call venv,$(1))"
	@$(call venv,$(1))/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall .
endef

# --- demo -------------------------------------------------------------------

demo: .venv/.tools
	$(call install,3.11)
	@rm -rf demo-out && mkdir -p demo-out
	@echo "--- memwatch record python samples/train.py (in demo-out/)"
	cd demo-out && ../.venv/bin/memwatch record -o train.mwt ../.venv/bin/python ../samples/train.py
	@echo "--- memwatch query train.mwt --tag layer1_weight --limit 5"
	.venv/bin/memwatch query demo-out/train.mwt --tag layer1_weight --limit 5
	@echo "--- memwatch state at the middle of the run, rebuilt from checkpoints"
	@seq=$$(.venv/bin/memwatch query demo-out/train.mwt --tag layer1_weight --format csv | awk -F, 'NR == 22 {print $$1}'); \
	echo ".venv/bin/memwatch state demo-out/train.mwt --tag layer1_weight --at $$seq --format values | head -4"; \
	.venv/bin/memwatch state demo-out/train.mwt --tag layer1_weight --at $$seq --format values | head -4; \
	.venv/bin/memwatch state demo-out/train.mwt --tag layer1_weight --at $$seq --format npy -o demo-out/w1_mid.npy
	@echo "--- memwatch blame train.mwt --tag layer1_weight --index 0,0"
	.venv/bin/memwatch blame demo-out/train.mwt --tag layer1_weight --index 0,0
	@echo "--- memwatch summary train.mwt"
	.venv/bin/memwatch summary demo-out/train.mwt
	@echo "--- memwatch export train.mwt -o changes.parquet, read back with pandas"
	.venv/bin/memwatch export demo-out/train.mwt -o demo-out/changes.parquet
	.venv/bin/memwatch export demo-out/train.mwt -o demo-out/elements.parquet --elements --tag layer1_weight
	.venv/bin/python -c 'import numpy as np, pandas as pd; df = pd.read_parquet("demo-out/changes.parquet"); el = pd.read_parquet("demo-out/elements.parquet"); print(df.groupby(["tag", "line"]).size().to_string()); print(el[["seq", "index", "old_value", "new_value"]].head(3).to_string(index=False)); print("the rebuilt middle state equals the one the program saved:", np.array_equal(np.load("demo-out/w1_mid.npy"), np.load("demo-out/train_w1_mid.npy")))'

# --- tests ------------------------------------------------------------------

test: lint rust-test py-test
	@echo "make test: all passed"

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps -q

# The recorder's unit tests link libpython: build them against the 3.11
# interpreter and let the loader find its shared library.
rust-test:
	cargo test -q
	@py="$(call find_python,3.11)"; libdir=$$("$$py" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))'); \
	echo "cargo test -p memwatch-recorder --lib (libpython from $$libdir)"; \
	PYO3_PYTHON="$$py" LD_LIBRARY_PATH="$$libdir$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" cargo test -q -p memwatch-recorder --lib

py-test: $(addprefix py-test-,$(PYTHON_VERSIONS))

# Debian's Chromium, for the browser tests of `memwatch report`
# (tests/test_report.py drives it with playwright; never `playwright
# install`, which downloads a browser). Installed only when missing and
# when root (as in CI); otherwise those tests are skipped, saying why.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "make: chromium is missing and this is not root: the browser tests of tests/test_report.py are skipped (apt-get install chromium)" >&2; fi; }

define py-test-rule
py-test-$(1): $(call venv,$(1))/.tools browser
	$(call install,$(1))
	@echo "--- pytest on CPython $(1)"
	$(call venv,$(1))/bin/python -m pytest -q
endef
$(foreach v,$(PYTHON_VERSIONS),$(eval $(call py-test-rule,$(v))))

clean:
	rm -rf .venv .venv-3.* demo-out dist
	cargo clean
