# Two commands a newcomer needs:  make demo  (the round trip on the local emulators)  and  make test.
# make dev: the local stack and the Dagster UI on the example code location; make bench: the benchmark table.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install demo dev test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# dagster dev needs dagster-webserver, which pins dagster to its own release: pip picks a matching pair
$(VENV)/.installed-ui: $(VENV)/.installed
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev,ui]'
	touch $@

demo: install
	$(PY) -m orchestrator.demo

dev: $(VENV)/.installed-ui
	$(PY) -m orchestrator.dev

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
