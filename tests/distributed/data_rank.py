"""Run under torchrun by tests/distributed/test_data_dist.py: one rank's epoch of packs through
EpochBatches on a real gloo process group; writes what it saw to OUT/rank<r>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trainer.config import load_config
from trainer.data.pipeline import EpochBatches, build_loader
from trainer.dist import init_distributed, shutdown
from trainer.models.registry import get_adapter


def main() -> None:
    out, epoch, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    rank, world = init_distributed()
    cfg = load_config(None, overrides)
    adapter = get_adapter(cfg.model.path)
    loader = build_loader(cfg.data, adapter, cfg.train.seed, rank=rank, world=world)
    loader.dataset.set_epoch(epoch)
    batches = EpochBatches(loader, adapter, cfg.data.max_skip_fraction)
    seen, empty = [], 0
    for pack in batches:
        if pack.empty:
            empty += 1
        seen.extend(pack.keys)
    (out / f"rank{rank}.json").write_text(
        json.dumps({"keys": seen, "steps": batches.steps, "empty": empty, "world": world})
    )
    shutdown()


if __name__ == "__main__":
    main()
