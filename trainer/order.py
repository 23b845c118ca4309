"""The training order, written as JSONL: one line per sample, in the order the steps take them.

    {"epoch": 0, "step": 12, "micro_batch": 25, "rank": 1, "source": "llava_665k.json", "id": "000000123"}

`python -m trainer.train --config C --dry-run --order-out FILE` writes an epoch's order without a model;
a training run with `--order-out FILE` writes what each optimizer step trained, across resumes: a run
that resumes from step N drops the lines of steps N and later (written after the checkpoint) first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.dist import gather_objects


def training_order(per_rank: list[list[tuple]]) -> list[tuple]:
    """(micro-batch, rank, source, ...) of every sample as the steps take them: micro-batch by micro-batch,
    rank by rank within one, each rank's samples in its order. `per_rank[r]` lists rank r's samples as
    (micro-batch, source, ...)."""
    rows = [
        (row[0], rank, i, row[1:]) for rank, samples in enumerate(per_rank) for i, row in enumerate(samples)
    ]
    return [(micro_batch, rank, *rest) for micro_batch, rank, _, rest in sorted(rows)]


def order_line(epoch: int, grad_accum: int, micro_batch: int, rank: int, source: str, sample_id: str) -> str:
    return (
        json.dumps(
            {
                "epoch": epoch,
                "step": micro_batch // grad_accum,
                "micro_batch": micro_batch,
                "rank": rank,
                "source": source,
                "id": sample_id,
            },
            ensure_ascii=False,
        )
        + "\n"
    )


class OrderLog:
    """What each optimizer step of a training run trained, appended to `path` by rank 0."""

    def __init__(self, path: Path, rank: int, sources: list[str], grad_accum: int) -> None:
        self.path, self.rank, self.sources, self.grad_accum = Path(path), rank, sources, grad_accum

    def resume(self, step: int) -> None:
        """Keep only the lines of steps before `step`: later ones were trained after the checkpoint."""
        if self.rank != 0 or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            if json.loads(line)["step"] < step
        ]
        self.path.write_text("".join(kept), encoding="utf-8")

    def log(self, epoch: int, step: int, packs: list[Any]) -> None:
        """Every rank calls this for every step taken, with the step's packs."""
        first = step * self.grad_accum
        mine = [
            (first + i, source, sample_id)
            for i, pack in enumerate(packs)
            for source, sample_id in zip(pack.sources, pack.ids)
        ]
        everyone = gather_objects(mine)
        if self.rank == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                for micro_batch, rank, source, sample_id in training_order(everyone):
                    f.write(
                        order_line(epoch, self.grad_accum, micro_batch, rank, self.sources[source], sample_id)
                    )
