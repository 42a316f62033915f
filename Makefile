# Two commands on a fresh machine (see README):
#   make demo   set up .venv and run the demo study on the built-in sample data
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==26.3
	$(PY) -m pip install -q -c constraints.txt -e '.[test,ray]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/mriface demo

test: setup
	$(PY) -m pytest -q -ra

bench: setup
	$(PY) -m benchmarks.run_all --small

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
