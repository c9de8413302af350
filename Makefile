# Two commands a newcomer needs:  make demo  (the round trip on the local emulators)  and  make test.
# make dev: the local stack and the Dagster UI on the example code location; make bench: the benchmark table.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install node-test test-setup demo dev test test-long bench clean

# the library with every side and the test tooling, plus the example function's own requirements (polars);
# installed by uv (from PyPI, into the venv): the same packages as pip resolves, in seconds instead of most
# of a minute. Byte-compiled as pip does: the suite's many Python processes would otherwise compile every
# module they import each time (PYTHONDONTWRITEBYTECODE is common on CI machines; it is set on ours), which
# cost a third more CPU. A user's own install is pip's (README), and the tests that install as a user use pip.
EXAMPLE_REQUIREMENTS := examples/sales/function/requirements.txt

$(VENV)/.installed: pyproject.toml $(EXAMPLE_REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e '.[dev]' -r $(EXAMPLE_REQUIREMENTS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m examples.sales.demo

# the dev command a user runs on their own code, here on the example (its sensors' subscriptions and its
# data-lake bucket are not resource settings, so they are named here)
dev: install
	$(VENV)/bin/gcf-pipes dev -m examples.sales.definitions \
		--function examples/sales/function/main.py:main --bucket data-lake \
		--subscription pipes-detached-completions=pipes-detached-replies \
		--subscription landing-objects=landing-notifications

# the Node.js function side (node/): installed from its lock file, built and unit-tested (node/Makefile); and
# the Node.js example installed (its package links node/), which tests/integration/test_node_function.py serves
NODE_EXAMPLE := examples/node_function

node-test:
	$(MAKE) -C node test

# the conformance kit's Node.js function (tests/conformance/), installed the same way
KIT_NODE := tests/conformance/functions/node

$(KIT_NODE)/node_modules/.installed: $(KIT_NODE)/package.json $(KIT_NODE)/package-lock.json
	cd $(KIT_NODE) && npm ci --no-audit --no-fund
	touch $@

$(NODE_EXAMPLE)/node_modules/.installed: $(NODE_EXAMPLE)/package.json $(NODE_EXAMPLE)/package-lock.json
	cd $(NODE_EXAMPLE) && npm ci --no-audit --no-fund
	touch $@

# the suite on PYTEST_WORKERS processes (pytest-xdist; each starts its own local stack on free ports): the tests
# mostly wait on the emulators, so 4 share 2 cores well; PYTEST_WORKERS=0 runs it in one process
PYTEST_WORKERS ?= 4

# what the suite needs, set up side by side (make -j: the venv's install and the Node.js side's take a minute
# between them on 2 cores, mostly waiting on the registries)
test-setup: install node-test $(NODE_EXAMPLE)/node_modules/.installed $(KIT_NODE)/node_modules/.installed

test:
	$(MAKE) -j4 test-setup
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal --durations=15 $(PYTEST_ARGS)

# the scenarios the default run has at a smaller size, at their full length (pytest -m long)
test-long:
	$(MAKE) -j4 test-setup
	$(PY) -m pytest -m long -n 2 --dist worksteal --durations=15 $(PYTEST_ARGS)

# the table, the chaos soak (bench/soak.py), the fan-out scale run to 10,000 shards with its CPU profile
# (bench/fanout.py), then their charts in docs/img/ (BENCH_ARGS=--quick: short runs, charts in bench/results/quick/img/)
FAN_OUT_SHARDS := $(if $(filter --quick,$(BENCH_ARGS)),1 10 100,1 100 1000 3000 10000)
RESULTS := bench/results$(if $(filter --quick,$(BENCH_ARGS)),/quick)
bench: install
	$(PY) -m bench $(BENCH_ARGS) && $(PY) -m bench.soak $(BENCH_ARGS) \
		&& $(PY) -m bench.fanout --shards $(FAN_OUT_SHARDS) --concurrency 100 --results $(RESULTS)/fan_out.json \
			--profile $(RESULTS)/fan_out_profile.txt \
		&& $(PY) -m bench.plots $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis $(NODE_EXAMPLE)/node_modules $(KIT_NODE)/node_modules
	$(MAKE) -C node clean
