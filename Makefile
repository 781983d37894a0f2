# Two commands for a fresh machine; each creates the virtual environment first if it is missing.
#   make demo   - the whole farm on this machine: private Redis, one worker, a few images
#   make test   - lint and the test suite (real redis-server, moto S3 over HTTP, worker processes)
#   make test-faults - the fault-injection suite and the chaos run (SIGKILL, Redis restart, S3 outage)

VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned: an unpinned torch can pull a multi-GB CUDA build.
# On a GPU machine pick the build you need, e.g. `make demo TORCH='torch==2.13.0 --index-url ...'`.
TORCH_PIN := torch==2.13.0
TORCH ?= $(TORCH_PIN)
# Every other package at the version CI tested: constraints.txt is the lock (`make lock` refreshes it);
# pyproject keeps its ranges for those who install fluxfarm as a library.
LOCK := constraints.txt
STAMP := $(VENV)/.fluxfarm-installed

.PHONY: demo test test-faults lint env tools lock clean

env: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c $(LOCK) -e '.[gpu,local,test]'
	touch $@

# Resolve pyproject's ranges (every extra, torch at its pin) to exact versions for Python 3.11 on Linux.
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv
	echo '$(TORCH_PIN)' | $(VENV)/bin/uv pip compile pyproject.toml - --all-extras \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet -o $(LOCK)

demo: $(STAMP)
	$(VENV)/bin/fluxfarm demo

# ruff, then the import floors (docs/architecture.md): shared imports nothing of producer or worker,
# producer never imports worker nor torch, quant never imports serve, tools only the command line;
# then mypy on shared and producer (tests/type_check.py).
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) tests/lint_layers.py
	$(PY) tests/type_check.py

# Programs the tests run beside redis-server: promtool (Debian's prometheus) checks the alert rules, and
# a headless Chromium with its driver shows the gateway's web page (tests/system/test_gateway_page.py).
tools:
	command -v promtool >/dev/null && command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -q && apt-get install -y -q --no-install-recommends prometheus chromium chromium-driver; }

# The test files are spread over TEST_PROCS processes (pytest-xdist; a file's tests stay in one process, so
# its module fixtures start once). The suite mostly waits on worker processes, Redis and S3: on 2 cores, 2
# processes took it from 22 to 13 minutes (3 were no faster).
TEST_PROCS ?= 2
test: lint tools
	$(PY) -m pytest -q -m "not faults and not chaos" -n $(TEST_PROCS) --dist loadfile

# The slower fault-injection suite: killed workers, Redis restarts, S3 outages, the chaos run (~10 min).
test-faults: $(STAMP)
	$(PY) -m pytest -q -m "faults or chaos"

clean:
	rm -rf $(VENV) fluxfarm-demo fluxfarm-output .pytest_cache .ruff_cache
