"""Run by tests/distributed/test_train_dist.py, alone or under torchrun: one backward pass over a fixed
set of packs split between the ranks, then the full gradients, the loss and a mixture of experts' router
figures to OUT/<tag>.pt.

    python tests/distributed/train_rank.py OUT TAG SCHEDULE key=value ...
SCHEDULE: "0,1,2,3" (one rank, four micro-batches) or "0,1|2,3" (rank 0 gets packs 0-1, rank 1
2-3); "text|image" gives rank 0 two text-only packs and rank 1 two packs with images.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import load_config
from trainer.data.pipeline import build_loader
from trainer.dist import init_distributed, shutdown
from trainer.loop import Trainer


def fixed_packs(cfg, adapter) -> list:
    loader = build_loader(cfg.data, adapter, cfg.train.seed)  # the same on every rank: world 1
    loader.dataset.set_epoch(0)
    return [p for p in loader if not p.empty]


def main() -> None:
    out, tag, schedule, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    rank, world = init_distributed()
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, rank, world)
    packs = fixed_packs(cfg, trainer.adapter)
    if schedule == "text|image":
        text = [i for i, p in enumerate(packs) if p.dummy][:2]
        image = [i for i, p in enumerate(packs) if not p.dummy][:2]
        assert len(text) == len(image) == 2, "the test data must give two packs of each kind"
        per_rank = [text, image]
    else:
        per_rank = [[int(i) for i in part.split(",")] for part in schedule.split("|")]
    assert len(per_rank) == world
    mine = [packs[i] for i in per_rank[rank]]
    loss = trainer.backward(mine)
    router = loss.router  # a mixture of experts: the step's router loss and expert load, over ranks
    tokens = torch.tensor(float(sum(p.length for p in mine)), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tokens)
        if router is not None:
            dist.all_reduce(router)
    grads = {}
    for name, p in trainer.model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.replace("_checkpoint_wrapped_module.", "")] = g.detach().clone()
    from torch.distributed.fsdp import FSDPModule

    units = [n for n, m in trainer.model.named_modules() if isinstance(m, FSDPModule)]
    placements = {
        name.replace("_checkpoint_wrapped_module.", ""): [str(p) for p in param.placements]
        for name, param in trainer.model.named_parameters()
        if hasattr(param, "placements")
    }
    if rank == 0:
        torch.save(
            {
                "loss": loss.total / loss.targets,
                "targets": loss.targets,
                "tokens": tokens.item(),
                "bad": not loss.finite,
                "grads": grads,
                "router": router,
                "units": [u.replace("_checkpoint_wrapped_module.", "").rstrip(".") for u in units],
                "placements": placements,
            },
            out / f"{tag}.pt",
        )
    if dist.is_initialized():
        dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
