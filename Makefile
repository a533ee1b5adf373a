# Two commands: `make demo` (the main job on a built-in model) and `make test`; `make check`: lint, format, types.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test check setup bench

$(BIN)/fewstep: pyproject.toml
	$(PY) -m venv $(VENV)
	@# k-diffusion goes in last and without its training-time dependencies (accelerate, wandb, torchvision, ...):
	@# its samplers need torchsde and torchdiffeq only. Taken out first, so no later install reports it incomplete.
	@$(BIN)/pip uninstall -q -y k-diffusion >/dev/null 2>&1 || true
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,all,check]" torchsde==0.2.6 torchdiffeq==0.2.5
	$(BIN)/pip install -q --no-deps k-diffusion==0.1.1.post1
	touch $(BIN)/fewstep

setup: $(BIN)/fewstep
	@git config core.hooksPath .githooks 2>/dev/null || true  # ruff and benchmarks/stale.py before each commit

demo: setup
	$(BIN)/fewstep demo --out out/demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

check: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/classic.py
