# lavis-dlip. `make demo` runs the main job on the embedded data; `make test` runs the tests.
# Both install into .venv first if needed (scripts/install.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo test lint bench study clean

$(STAMP): setup.py lavis_dlip_autoload.pth requirements/constraints.txt requirements/runtime.txt requirements/dev.txt scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lavis_dlip.demo

# Two pytest workers, one thread each: the tests are many small CPU-bound runs, which two
# single-threaded processes finish sooner than one process with two threads.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal tests

lint: $(STAMP)
	$(VENV)/bin/ruff check lavis_dlip tests benchmarks

# DLIP's analysis on the demo data (projects/dlip/study/): arms x 3 seeds each, on the demo's teachers;
# results in output/study/<name>/study.md (docs/benchmarks/study_*.md hold the committed ones)
study: $(STAMP)
	$(PY) -m lavis_dlip.study --cfg-path projects/dlip/study/retrieval.yaml
	$(PY) -m lavis_dlip.study --cfg-path projects/dlip/study/retrieval_budget.yaml
	$(PY) -m lavis_dlip.study --cfg-path projects/dlip/study/caption.yaml

bench: $(STAMP)
	$(PY) benchmarks/compression.py
	$(PY) benchmarks/distill_cost.py

clean:
	rm -rf output .pytest_cache
