"""What the tests share, in one place: paths and the environment for subprocesses here, samples
(samples.py), real media (media.py), shard sets (shards.py), pinned versions (versions.py)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Subprocesses: nothing downloaded, one thread each (at most two processes run at a time).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
