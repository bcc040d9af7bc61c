# sk: `make demo` and `make test` are all a newcomer needs (python3 and make).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: all venv bytecode demo test test-fast bench man clean

all: venv

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@
	$(MAKE) -s bytecode

# commands start faster from compiled modules (also when PYTHONDONTWRITEBYTECODE is set)
bytecode:
	$(PY) -m compileall -q lib server

demo: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash tools/demo.sh

# two workers, each taking the next test as it frees up: the suite mostly waits on real servers
test: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -n 2 --dist worksteal

# the unit tier: no real server, no PostgreSQL
test-fast: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -n 2 -m "not slow"

bench: venv bytecode
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) bench/bench.py $(BENCH_ARGS)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) bench/bench_watch.py $(BENCH_WATCH_ARGS)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) bench/bench_scale.py $(BENCH_SCALE_ARGS)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) bench/bench_join.py $(BENCH_JOIN_ARGS)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) bench/bench_wire.py $(BENCH_WIRE_ARGS)

man: venv
	$(PY) tools/genman.py

clean:
	rm -rf $(VENV) build *.egg-info lib/*.egg-info .pytest_cache
