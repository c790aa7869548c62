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

# Two pytest workers, one thread each: the tests are many small CPU-bound runs, which two
# single-threaded processes finish sooner than one process with two threads.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check lavis_dlip tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/compression.py
	$(PY) benchmarks/distill_cost.py

clean:
	rm -rf output .pytest_cache
