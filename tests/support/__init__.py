"""What the tests share, in one place: paths and the environment for subprocesses here, samples
(samples.py), real media (media.py), shard sets (shards.py), pinned versions (versions.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Subprocesses: nothing downloaded, one thread each (at most two processes run at a time).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# The families `make test-fast` sweeps: the generic path, 3-D rope and native video, tiles, block masks,
# linear attention run per packed sample.
FAST_FAMILIES = ("gemma3", "idefics3", "llava", "qwen2_vl", "qwen3_5")


def family_params(families: list[str]) -> list:
    """`families` for a parametrized test, those outside FAST_FAMILIES marked slow: `make test` runs
    them all, `make test-fast` a sample that still covers each code path."""
    return [pytest.param(f, marks=() if f in FAST_FAMILIES else pytest.mark.slow) for f in families]
