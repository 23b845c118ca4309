"""Two real ranks (torchrun, gloo): every occurrence of the epoch is consumed by exactly one rank,
and both ranks step the same number of times, the one with fewer packs padding with empty ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from data_tools.manifest import load_manifest
from data_tools.plan import plan_epoch
from tests.support import REPO
from trainer.config import load_config
from trainer.data.pipeline import build_loader, plan_seed
from trainer.models.registry import get_adapter


def overrides(tiny, shards: Path) -> list[str]:
    return [
        f"model.path={tiny('llava')}",
        f"data.shards={shards}",
        "data.workers=0",
        "data.shuffle_buffer=4",
        "data.packing.buffer=3",
        "data.packing.max_tokens=1536",
    ]


def packs_per_rank(cfg, epoch: int) -> list[int]:
    adapter = get_adapter(cfg.model.path)
    counts = []
    for rank in range(2):
        loader = build_loader(cfg.data, adapter, cfg.train.seed, rank=rank, world=2)
        loader.dataset.set_epoch(epoch)
        counts.append(sum(1 for p in loader if not p.empty))
    return counts


def test_two_ranks_exactly_once_and_equal_steps(tiny, stream_shards: Path, tmp_path: Path) -> None:
    args = overrides(tiny, stream_shards)
    cfg = load_config(None, args)
    # Pick an epoch where the ranks' pack counts differ, so the empty-pack path is exercised.
    epoch, counts = next((e, c) for e in range(20) if len(set(c := packs_per_rank(cfg, e))) > 1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            str(REPO / "tests" / "distributed" / "data_rank.py"),
            str(tmp_path),
            str(epoch),
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["steps"] == ranks[1]["steps"] == max(counts)
    assert sorted(r["empty"] for r in ranks) == [0, abs(counts[0] - counts[1])]
    occurrences = [k[2] for r in ranks for k in r["keys"]]
    manifest = load_manifest(stream_shards)
    plan = plan_epoch(manifest, plan_seed(manifest, cfg.train.seed), epoch)
    assert sorted(occurrences) == list(range(len(plan)))  # disjoint and complete
    assert not set(k[2] for k in ranks[0]["keys"]) & set(k[2] for k in ranks[1]["keys"])
