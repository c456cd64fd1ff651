# The README's commands. `make test` builds .venv with the train and dev extras,
# installs Mosquitto and Chromium (the browser test) when missing (root only) and node-opcua
# (tests/node, npm ci), then lints,
# checks the import layout, type-checks and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint imports typecheck pytest test-gpu bench bench-gpu mosquitto browser node-opcua clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamp files record which extras are installed; they are redone when pyproject changes.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[train,dev]'
	touch $@

# `make run` needs only the core package: a plant box has no torch.
$(VENV)/.core-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

run: $(VENV)/.core-installed
	$(BIN)/crystal-monitor demo --state-dir .state

mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing the mosquitto broker binary (tests start their own broker)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	else \
		echo "mosquitto is missing: run 'sudo apt-get install mosquitto'"; exit 1; \
	fi

# The dashboard's browser test drives Debian's chromium through its chromedriver.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium and chromium-driver (the dashboard's browser test)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "chromium is missing: run 'sudo apt-get install chromium chromium-driver'"; exit 1; \
	fi

# The OPC UA Alarms and Conditions test's second client stack: node-opcua from the npm
# registry into tests/node (package-lock.json pinned), run with the machine's Node.js.
node-opcua:
	@if [ -d tests/node/node_modules/node-opcua ]; then :; \
	elif command -v npm >/dev/null 2>&1; then \
		echo "installing node-opcua into tests/node (the OPC UA conditions test's client)"; \
		cd tests/node && npm ci --no-audit --no-fund --loglevel=error; \
	else \
		echo "Node.js and npm are missing: run 'sudo apt-get install nodejs npm' (Node.js 20+)"; exit 1; \
	fi

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .

# The package layout: layers in data-flow order, no cycles, no torch ([tool.importlinter]).
imports: $(VENV)/.dev-installed
	$(BIN)/lint-imports

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy

pytest: $(VENV)/.dev-installed mosquitto browser node-opcua
	$(BIN)/pytest -m "not gpu"

test: lint imports typecheck pytest

# GPU hosts only: the tensorrt extra as well. `test-gpu` runs just the tests marked gpu and
# fails when none ran or any was skipped (--require-gpu, see tests/conftest.py).
$(VENV)/.gpu-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[train,dev,tensorrt]'
	touch $@

test-gpu: $(VENV)/.gpu-installed
	$(BIN)/pytest -m gpu --require-gpu

# TensorRT engine only vs end to end, then the daemon's scaling with 1, 4 and all worker
# processes on TensorRT; both write their tables into BENCHMARKS.md, naming the GPU.
bench-gpu: $(VENV)/.gpu-installed
	$(BIN)/python -m bench.gpu_throughput --write
	$(BIN)/python -m bench.scaling --backend tensorrt --batch 64 --workers 1,4,all \
		--crops 3000 --frames 40 --latency-seconds 10 --write

bench: $(VENV)/.dev-installed
	@echo "(bench.classify_throughput needs a training run: see BENCHMARKS.md)"
	$(BIN)/python -m bench.daemon_throughput

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
