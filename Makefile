# The two commands of the README: `make test` and `make demo`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONHASHSEED := 0

.PHONY: install test test-fast demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

lint: $(STAMP)
	$(PY) check_flags.py .

# Two test processes (pytest-xdist). tests/conftest.py makes each test module
# one scope (its module fixtures built once) but for the modules whose tests
# are each long, and puts the longest modules first; xdist hands the scopes
# out in that order.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

test: lint
	$(PYTEST) tests

# The suite without the tests marked slow: for a quick loop while editing.
test-fast: lint
	$(PYTEST) -m 'not slow' tests

demo: $(STAMP)
	$(PY) util_scripts/run_demo.py --output_dir=demo_out

# Each prints ratios against the peer measured in the same run. The input
# pipeline bench reads the demo's cache: run `make demo` first.
bench: $(STAMP)
	$(PY) bench/bench_gpt2.py
	$(PY) bench/bench_retrieval.py
	$(PY) bench/bench_input_pipeline.py

clean:
	rm -rf demo_out bench_out .pytest_cache
