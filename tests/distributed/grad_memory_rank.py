"""Run under torchrun by tests/distributed/test_train_dist.py: one step of two micro-batches on FSDP2
ranks; just before the second micro-batch's forward and after the step's backward, how many bytes of
gradients the rank holds, unsharded (FSDP's buffers for a deferred reduce-scatter) and sharded (and the
sharded gradients' full size), written to OUT/<tag>-rank<r>.json.

    python tests/distributed/grad_memory_rank.py OUT TAG key=value ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch.distributed.fsdp import FSDPModule

from trainer import loop
from trainer.config import load_config
from trainer.data.pipeline import build_loader
from trainer.dist import init_distributed, shutdown


def held(model) -> dict[str, int]:
    """Gradient bytes on this rank: FSDP's unsharded gradients (internal state of torch's FSDP2: the
    autograd gradient of the all-gathered parameter, or its reduce-dtype accumulation), and the sharded
    gradients of the parameters."""
    unsharded = 0
    for module in model.modules():
        if isinstance(module, FSDPModule) and (group := module._get_fsdp_state()._fsdp_param_group):
            for p in group.fsdp_params:
                autograd = getattr(getattr(p, "_unsharded_param", None), "grad", None)
                for g in (p.unsharded_accumulated_grad, autograd):
                    unsharded += 0 if g is None else g.numel() * g.element_size()
    with_grad = [p for p in model.parameters() if p.grad is not None]
    return {
        "unsharded": unsharded,
        "sharded": sum(p.grad.to_local().numel() * p.grad.element_size() for p in with_grad),
        "full": sum(p.grad.numel() * p.grad.element_size() for p in with_grad),
    }


def main() -> None:
    out, tag, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    rank, world = init_distributed()
    cfg = load_config(None, overrides)
    trainer = loop.Trainer(cfg, rank, world)
    loader = build_loader(cfg.data, trainer.adapter, cfg.train.seed)  # the same packs on every rank
    packs = [p for p in loader if not p.empty][:2]
    seen = []
    compute = loop.micro_batch_loss

    def measured(model, *args, **kwargs):
        seen.append(held(model))
        return compute(model, *args, **kwargs)

    loop.micro_batch_loss = measured
    trainer.backward(packs)
    # After the step's last reduce-scatter every gradient is sharded: its shard and full sizes.
    result = {"between": seen[1], "after": held(trainer.model)}
    (out / f"{tag}-rank{rank}.json").write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main()
