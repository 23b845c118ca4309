"""Run under torchrun by tests/distributed/test_train_dist.py: build the model from a bf16 checkpoint
(full, LoRA or QLoRA), take one optimizer step, and write to OUT/<tag>-rank<r>.json each parameter's
dtype (trainable or frozen), whether its full weight equals the checkpoint's before the step, and the
optimizer state's dtypes.

    python tests/distributed/dtype_rank.py OUT TAG key=value ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import load_config
from trainer.data.pipeline import build_loader
from trainer.dist import init_distributed, shutdown
from trainer.loop import Trainer
from trainer.model import checkpoint_dtype


def plain(name: str) -> str:
    """A parameter's name in the checkpoint: without peft's and the checkpoint wrapper's prefixes."""
    for part in ("_checkpoint_wrapped_module.", "base_model.model.", "base_layer."):
        name = name.replace(part, "")
    return name


def main() -> None:
    out, tag, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    rank, world = init_distributed()
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, rank, world)
    stored = checkpoint_dtype(trainer.adapter)
    reference = trainer.adapter.load_model(dtype=stored).state_dict()
    params = {}
    for name, p in trainer.model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        key = plain(name)
        same = None
        if key in reference and "lora_" not in name and p.is_floating_point():
            same = torch.equal(full.detach().cpu(), reference[key].to(full.dtype))
        params[name] = {
            "dtype": str(p.dtype).removeprefix("torch."),
            "trainable": p.requires_grad,
            "class": type(p.to_local() if hasattr(p, "to_local") else p).__name__,
            "equal": same,
        }
    loader = build_loader(cfg.data, trainer.adapter, cfg.train.seed)  # the same packs on every rank
    packs = [p for p in loader if not p.empty][:1]
    loss = trainer.step(packs, wait=0.0)
    states = sorted(
        {
            str(v.dtype).removeprefix("torch.")
            for s in trainer.optimizer.state.values()
            for v in s.values()
            if torch.is_tensor(v) and v.dim() > 0
        }
    )
    after = sorted(
        {str(p.dtype).removeprefix("torch.") for p in trainer.model.parameters() if p.requires_grad}
    )
    result = {
        "stored": str(stored),
        "params": params,
        "loss": loss,
        "optimizer_states": states,
        "trainable_after_step": after,
    }
    (out / f"{tag}-rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
