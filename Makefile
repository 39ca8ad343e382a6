# vitkit: two commands on a fresh machine.
#   make run    create/reuse .venv, install, train the default model on the bundled digits (offline, ~2 min)
#   make test   create/reuse .venv, install, run the default test suite (fast; `make test-slow` for the rest)
#
# The virtual environment sees the system site-packages, so a torch that is already installed is reused.
# If none is importable, a torch wheel from pip's local find-links is preferred (its small pure-Python
# dependencies come from the registry), and only then the registry's build. Installing vitkit itself then adds nothing torch-related: its requirement is
# a range (torch>=2.3) that the installed build satisfies.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitkit-installed

.PHONY: run test test-slow lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null \
		|| { $(PY) -m pip download -q --no-index --no-deps "torch>=2.3" -d $(VENV)/local-wheels \
		     && $(PY) -m pip install $(VENV)/local-wheels/torch-*.whl; } \
		|| $(PY) -m pip install "torch>=2.3"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q -e ".[export]" || echo "optional ONNX export extra not installed: its tests will skip"
	$(PY) -m pip install -q -e ".[serve]" || echo "optional serve extra not installed: the vitkit serve tests will skip"
	for extra in kernels int8 coreml executorch openvino; do \
		$(PY) -m pip install -q -e ".[$$extra]" || echo "optional $$extra extra not installed: its export tests will skip"; \
	done
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/vitkit train

# the default suite runs in parallel (pytest-xdist, one worker per core, at most 4; each worker takes its share of
# torch threads, tests/conftest.py): 5 min 20 s on 2 AMD EPYC cores against 8 min 37 s in one process
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist worksteal

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check $(wildcard src tests benchmarks)
	$(PY) -m ruff format --check $(wildcard src tests benchmarks)

format: $(STAMP)
	$(PY) -m ruff format $(wildcard src tests benchmarks)
	$(PY) -m ruff check --fix $(wildcard src tests benchmarks)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
