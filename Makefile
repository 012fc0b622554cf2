# Everyday commands. Each target creates the virtual environment in .venv/ on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= workdirs/digits

.PHONY: install digits test pytest lint format bench clean

$(VENV)/.installed: setup.cfg pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The main job: train on the embedded digits dataset, then write samples.
digits: install
	$(BIN)/python -m experiments.main --config=configs/digits.py --workdir=$(WORKDIR)
	$(BIN)/python -m experiments.main --config=configs/digits.py --workdir=$(WORKDIR) --mode=sample

# Lint, type check, then the test suite (what CI runs).
test: lint pytest

pytest: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy diffusion_jax

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python benchmarks/unet_forward.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
