# mmloom: `make demo` sets up and runs the bundled demo, `make test` sets up and runs the tests
# (`make test-fast`: the unit tier in under 3 minutes; `make lint`: ruff check and format).
# Both create .venv/ on first use (about two minutes) and reuse it afterwards.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The pinned PyTorch pair; override for another CUDA build, e.g.
#   make setup TORCH="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.mmloom-installed
DEMO   ?= runs/demo
# The exact versions the whole suite last passed with; every install here goes through them.
CONSTRAINTS ?= constraints.txt
PIP     = $(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS)

.PHONY: setup demo test test-fast lint slurm test-latest constraints clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e ".[dev]"
	touch $(STAMP)

# The demo: shard the bundled data, build a tiny LLaVA-1.5 (real token geometry, random weights),
# preview one sample, dry-run an epoch, train on 2 CPU ranks (FSDP2) with the loss falling,
# export, and generate from the export with plain transformers.
RUN    = HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
demo: setup runs/tiny-llava/config.json
	$(BIN)/python data_tools/shard.py data_tools/demo/data.txt --out $(DEMO)/shards --workers 2
	$(BIN)/python data_tools/inspect.py $(DEMO)/shards --verify
	$(RUN) $(BIN)/python -m trainer.preview --model runs/tiny-llava --sample data_tools/demo/llava_images.json --index 2
	$(RUN) $(BIN)/torchrun --nproc-per-node 2 -m trainer.train --config configs/tiny-llava.yaml --dry-run
	rm -rf $(DEMO)/run
	$(RUN) $(BIN)/torchrun --nproc-per-node 2 -m trainer.train --config configs/tiny-llava.yaml
	$(RUN) $(BIN)/python -m trainer.generate $(DEMO)/run/hf --prompt "What animal is this?" --image data_tools/demo/media/chelsea.jpg

runs/tiny-llava/config.json: trainer/tiny/common.py trainer/tiny/llava.py
	$(RUN) $(BIN)/python -m trainer.tiny --family llava --out runs/tiny-llava

test: setup slurm
	$(BIN)/python -m pytest tests

# The unit tier without the tests marked slow: under 3 minutes on 2 cores, for every edit.
test-fast: setup
	$(BIN)/python -m pytest tests/unit -m "not slow" -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The launcher tests start a real SLURM cluster here: Debian's slurm-wlm and munge (root only).
slurm:
	@command -v slurmctld >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null)

# The whole suite on the newest releases, in a venv of its own (.venv-latest; the pinned .venv is left
# alone): pytest's header lists every package that differs from constraints.txt, and the failures are
# what the next bump breaks. Once it passes, `make constraints VENV=.venv-latest` records the versions.
LATEST       ?= .venv-latest
TORCH_LATEST ?= torch torchvision
test-latest: slurm
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade $(TORCH_LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
	MMLOOM_UNPINNED=1 $(LATEST)/bin/python -m pytest tests

# Write constraints.txt from a venv the whole suite has just passed in (default .venv).
constraints:
	{ echo "# The exact versions mmloom's whole test suite (make test) last passed with: CPython \
	$$($(BIN)/python -c 'import platform; print(platform.python_version(), platform.machine())'),"; \
	  echo "# written $$(date +%Y-%m-%d) by 'make constraints'. make setup / demo / test and .ci/run install"; \
	  echo "# through them (pip --constraint); setup.cfg keeps the lower bounds. Moving to newer releases:"; \
	  echo "# make test-latest, fix what it finds, make constraints VENV=.venv-latest (docs/development.md: Tested versions)."; \
	  $(BIN)/python -m pip freeze --exclude-editable; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) $(LATEST) runs build *.egg-info
