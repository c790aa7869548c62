# lavis-dlip. `make demo` runs the main job on the embedded data; `make test` runs the tests.
# Both install into .venv first if needed (scripts/install.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo test lint bench clean

$(STAMP): setup.py requirements/constraints.txt requirements/runtime.txt requirements/dev.txt scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lavis_dlip.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check lavis_dlip tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/compression.py
	$(PY) benchmarks/distill_cost.py

clean:
	rm -rf output .pytest_cache
