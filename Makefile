# Two entry points for a fresh machine:  `make demo` (main job)  and  `make test`.
# Both are idempotent: the virtual environment and the data are reused when present.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup data demo test slurm browser clean-runs

setup: $(VENV)/.installed

# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml; pip takes them from
# this machine's disk where they lie there, otherwise from PyPI.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test,cluster]'
	touch $@

data: setup
	scripts/get_fashion_mnist.sh data/raw

# The whole workflow on the default profile (config/demo.yaml): every table and figure.
demo: data
	$(BIN)/snakemake --cores 2

# tests/test_slurm.py brings up a one-node Slurm (scripts/slurm_local.sh); as root, `make test`
# installs Debian's slurm-wlm and munge first where they are missing (elsewhere those tests skip).
# Likewise Debian's chromium, in which tests/test_workflow.py renders the Snakemake report and
# the `dvc plots show` page (elsewhere those tests skip).
test: data slurm browser
	$(BIN)/python -m pytest -q

slurm:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then bash scripts/slurm_local.sh install \
	  || echo "could not install slurm-wlm and munge: tests/test_slurm.py will skip its Slurm tests"; \
	else echo "not root: the Slurm tests run only where slurm-wlm and munge are installed"; fi

browser:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "could not install chromium: the browser tests of tests/test_workflow.py will skip"; \
	else echo "not root: the browser tests run only where chromium is installed"; fi
