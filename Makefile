# Everything a fresh machine needs: `make demo` and `make test` create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-full test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  # in a 15-minute budget after the install (BUDGET=minutes to change it)
	$(PY) scripts/demo.py --budget-minutes $(or $(BUDGET),15)

demo-full: $(STAMP)  # the full quickstart recipes, whatever they take (about 16-32 min on 2 cores)
	$(PY) scripts/demo.py --full

test: $(STAMP)
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
