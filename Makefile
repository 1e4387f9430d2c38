# Every target creates .venv and installs leanvision with its test extras when they are missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench data

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# The demo trains on Fashion-MNIST where `make data` installed it, else on the generated fallback
# (synthetic:multilines); its plan says which. OMP_WAIT_POLICY=PASSIVE: PyTorch's threads sleep at
# barriers instead of spinning; on a 2-core machine shared with other processes spinning made a
# training step 4-25x slower.
demo: $(STAMP)  ## the main job: MobileNetV2 vs ReXNet vs ReXNet-RNNPool, 2 seeds each
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/leanvision demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)  ## fast test suite (slow tests are marked and skipped)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)  ## ruff, and the import contract (imports go downward only: [tool.importlinter] in pyproject)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports

bench: $(STAMP)  ## speed comparison against timm, writes results/rexnet_speed.json
	$(PY) benchmarks/rexnet_speed.py

data:  ## Fashion-MNIST into /usr/share/datasets/fashion-mnist (Debian/Ubuntu, as root)
	apt-get update && apt-get install -y dataset-fashion-mnist
