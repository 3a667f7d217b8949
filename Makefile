# seal: make demo (run the bundled example on a local stack), make test (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install protos test test-fast lint demo up clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch (on this machine's disk); GPU hosts install their own build first.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

protos: $(STAMP)
	PATH="$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. \
		--mypy_out=. --mypy_grpc_out=. proto/seal/v1/*.proto

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy seal

demo: $(STAMP)
	$(VENV)/bin/seal demo

up: $(STAMP)
	$(VENV)/bin/seal up

clean:
	rm -rf $(VENV) .pytest_cache
