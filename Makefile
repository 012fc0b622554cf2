# Everyday commands. Each target creates the virtual environment in .venv/ on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= workdirs/digits

.PHONY: install digits digits-eval digits-table test test-fast pytest lint format bench clean

$(VENV)/.installed: setup.cfg pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The main job: train on the embedded digits dataset, write samples, then score them (digits FD).
digits: install
	$(BIN)/python -m experiments.main --config=configs/digits.py --workdir=$(WORKDIR)
	$(BIN)/python -m experiments.main --config=configs/digits.py --workdir=$(WORKDIR) --mode=sample
	$(MAKE) digits-eval

# Reference statistics of the digits splits (seconds; once per data_dir), then --mode=eval.
digits-eval: install
	$(BIN)/python -m experiments.reference_stats --dataset=digits --split=train --network=digits
	$(BIN)/python -m experiments.reference_stats --dataset=digits --split=test --network=digits
	$(BIN)/python -m experiments.main --config=configs/digits.py --workdir=$(WORKDIR) --mode=eval

# The digits table of docs/evaluation.md: digits FD of 1000 samples per sampler, steps, spacing
# and Gaussian start (one eval each, resumable), then the table.
TABLE_SAMPLERS ?= ddpm,ddim,dpm_solver++,dpm_solver++3m,dpm_solver++2m_sde,heun
TABLE_STEPS ?= 10,20
TABLE_SPACINGS ?= linspace,karras
TABLE_GAUSSIAN_START ?= 0,900
TABLE_SEEDS ?= 0
digits-table: install
	$(BIN)/python -m experiments.sampler_table --config=configs/digits.py --workdir=$(WORKDIR) \
		--samplers=$(TABLE_SAMPLERS) --steps=$(TABLE_STEPS) --spacings=$(TABLE_SPACINGS) \
		--gaussian_start=$(TABLE_GAUSSIAN_START) --seeds=$(TABLE_SEEDS)

# Lint, type check, then the whole test suite, slow end-to-end tests included (what CI runs).
test: lint pytest

pytest: install
	$(BIN)/python -m pytest -q

# The iteration loop: no lint, and no tests marked slow (multi-process, kill/SIGTERM, 8-device,
# notebook, sweep end-to-end, Inception compile, mode runs over about 2 s); under 3 minutes.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy diffusion_jax
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
