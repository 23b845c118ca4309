# mmloom: `make demo` sets up and runs the bundled demo, `make test` sets up and runs the tests.
# Both create .venv/ on first use (about two minutes) and reuse it afterwards.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The pinned PyTorch pair; override for another CUDA build, e.g.
#   make setup TORCH="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.mmloom-installed
DEMO   ?= runs/demo

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/python data_tools/shard.py data_tools/demo/data.txt --out $(DEMO)/shards --workers 2
	$(BIN)/python data_tools/inspect.py $(DEMO)/shards --verify
	$(BIN)/python data_tools/inspect.py $(DEMO)/shards --sample compare-1

test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs build *.egg-info
