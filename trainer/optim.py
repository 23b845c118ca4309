"""AdamW with one parameter group per (module group, decay) pair, and the LR schedule.

Groups: vision tower, projector, language model (Phi3-Vision style `optim.vision_lr`,
`optim.projector_lr`, `optim.lr`), each split into decayed weights and undecayed norms/biases.
The schedule is linear warmup, then cosine or linear decay to `lr * min_lr_ratio`, per step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import OptimConfig
from trainer.models.building import Building


def no_decay(name: str, p: nn.Parameter) -> bool:
    return (
        p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() or "embeddings.class_embedding" in name
    )


def build_optimizer(
    model: nn.Module, adapter: Building, cfg: OptimConfig, fused: bool
) -> torch.optim.Optimizer:
    lrs = {
        "llm": cfg.lr,
        "vision": cfg.lr if cfg.vision_lr is None else cfg.vision_lr,
        "projector": cfg.lr if cfg.projector_lr is None else cfg.projector_lr,
    }
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((adapter.param_group(name), no_decay(name, p)), []).append(p)
    param_groups = [
        {
            "params": ps,
            "lr": lrs[g],
            "base_lr": lrs[g],
            "weight_decay": 0.0 if nd else cfg.weight_decay,
            "name": f"{g}{'/no_decay' if nd else ''}",
        }
        for (g, nd), ps in sorted(groups.items())
    ]
    return torch.optim.AdamW(
        param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None
    )


def lr_factor(step: int, progress: float, cfg: OptimConfig) -> float:
    """Multiplier of each group's base LR at optimizer step `step` (0-based): a linear warmup over
    the first `warmup_steps` steps, then the schedule's decay at `progress`, the fraction of the
    post-warmup run done (0 to 1)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, progress))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def step_progress(step: int, total: int, cfg: OptimConfig) -> float:
    """`progress` for lr_factor when the run is `total` optimizer steps long."""
    return (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)


def set_lr(optimizer: torch.optim.Optimizer, step: int, progress: float, cfg: OptimConfig) -> None:
    factor = lr_factor(step, progress, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
