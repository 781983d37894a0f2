# Two commands for a fresh machine; each creates the virtual environment first if it is missing.
#   make demo   - the whole farm on this machine: private Redis, one worker, a few images
#   make test   - lint and the test suite (real redis-server, moto S3 over HTTP, worker processes)
#   make test-faults - the fault-injection suite and the chaos run (SIGKILL, Redis restart, S3 outage)

VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned: an unpinned torch can pull a multi-GB CUDA build.
# On a GPU machine pick the build you need, e.g. `make demo TORCH='torch==2.13.0 --index-url ...'`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.fluxfarm-installed

.PHONY: demo test test-faults lint env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[gpu,local,test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/fluxfarm demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q -m "not faults and not chaos"

# The slower fault-injection suite: killed workers, Redis restarts, S3 outages, the chaos run (~10 min).
test-faults: $(STAMP)
	$(PY) -m pytest -q -m "faults or chaos"

clean:
	rm -rf $(VENV) fluxfarm-demo fluxfarm-output .pytest_cache .ruff_cache
