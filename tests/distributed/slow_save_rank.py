"""Run by tests/distributed/test_async_checkpoint.py under torchrun: `python -m trainer.train` whose
checkpoint write of step SLOW_STEP sleeps for ten minutes in DCP's background thread, so that a kill
lands during that write. It notes in FLAGS (a directory) that the write began (`writing-rank<r>`) and
each optimizer step the training thread finishes (`step-<N>-rank<r>`).

    torchrun --nproc-per-node 2 tests/distributed/slow_save_rank.py FLAGS SLOW_STEP key=value ...
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from torch.distributed.checkpoint.filesystem import _FileSystemWriter

import trainer.loop
from trainer.train import main

flags, slow_step, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
rank = os.environ.get("RANK", "0")
real_write, real_step = _FileSystemWriter.write_data, trainer.loop.Trainer.step


def slow_write(self, plan, planner):
    if Path(self.path).name == f".step-{slow_step}.tmp":
        (flags / f"writing-rank{rank}").touch()
        time.sleep(600)
    return real_write(self, plan, planner)


def noted_step(self, *args, **kwargs):
    loss = real_step(self, *args, **kwargs)
    (flags / f"step-{self.state.step}-rank{rank}").touch()
    return loss


_FileSystemWriter.write_data = slow_write
trainer.loop.Trainer.step = noted_step
sys.exit(main(overrides))
