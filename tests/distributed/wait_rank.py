"""Run under torchrun by tests/distributed/test_train_dist.py: rank 0 works alone for 3 s (a slow load)
before calling trainer.dist.wait_for_rank0; the other rank waits on the store with a 1 s timeout (it
must fail, naming train.dist_timeout_s), then at once, for rank 0's second 3 s piece of work, with a
30 s one (it must wait both pieces out: 5 s, longer than the process group's 2 s timeout).
Writes OUT/wait-rank<r>.json."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from trainer.dist import init_distributed, shutdown, wait_for_rank0


def main() -> None:
    out = Path(sys.argv[1])
    rank, _ = init_distributed(timeout_s=2)  # shorter than rank 0's work: no collective may wait it out
    result = {}
    for timeout in (1, 30):
        start = time.monotonic()
        if rank == 0:
            time.sleep(3)
        try:
            wait_for_rank0("the test's slow work", timeout)
            result[timeout] = ["ok", round(time.monotonic() - start, 1)]
        except TimeoutError as e:
            result[timeout] = [str(e), round(time.monotonic() - start, 1)]
    (out / f"wait-rank{rank}.json").write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main()
