# Two commands do all the set-up on a fresh machine:
#   make demo   — install (CPU torch 2.13.0 + deltatune[cli]) and run `deltatune demo`
#   make test   — install (CPU torch 2.13.0 + deltatune[dev]) and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet

.PHONY: demo test test-slow lint bench quality clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-hf: pyproject.toml | $(BIN)/python
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[hf]"
	touch $@

$(VENV)/.installed-cli: pyproject.toml | $(BIN)/python
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[cli]"
	touch $@ $(VENV)/.installed-hf

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	touch $@ $(VENV)/.installed-hf $(VENV)/.installed-cli

demo: $(VENV)/.installed-cli
	$(BIN)/deltatune demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

test-slow: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m 'slow or not slow'

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/lora_speed.py

# every method against full fine-tuning and HF peft on real data (about 80 minutes, 2 cores)
quality: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
