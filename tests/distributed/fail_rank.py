"""Run by tests/distributed/test_train_dist.py under torchrun: `python -m trainer.train` whose forward pass
raises on rank 1 at its third micro-batch (as a CUDA out-of-memory error would), to show the job
ends promptly with that error instead of rank 0 waiting in a collective until the timeout.

    torchrun --nproc-per-node 2 tests/distributed/fail_rank.py key=value ...
"""

from __future__ import annotations

import os
import sys

import trainer.loop
from trainer.train import main

real = trainer.loop.micro_batch_loss
calls = 0


def failing(*args, **kwargs):
    global calls
    calls += 1
    if os.environ.get("RANK") == "1" and calls == 3:
        raise RuntimeError("injected failure in the forward pass on rank 1")
    return real(*args, **kwargs)


trainer.loop.micro_batch_loss = failing
sys.exit(main(sys.argv[1:]))
