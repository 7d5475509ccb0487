# Two entry points (see README): `make demo` and `make test`. Both create .venv if it is missing
# and reuse it when present. Torch is pinned here (not in pyproject) so that CPU machines take the
# local CPU build instead of a multi-GB CUDA one; GPU clusters: see README "Installing on a GPU cluster".
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.avi-installed
TORCH_PIN ?= torch==2.13.0

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH_PIN)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	bash launch/demo.sh

test: $(STAMP)
	bash launch/run_tests.sh

.PHONY: setup demo test
