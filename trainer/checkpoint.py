"""Checkpoints: `run.dir/checkpoints/step-<N>/`, written with torch.distributed.checkpoint.

Model and optimizer are saved sharded (DCP); what differs per rank (its data pipeline state,
RNG states) goes into `rank<r>.pt` beside them, with the step, epoch and counters: tensors,
numbers, strings and containers only, read back with `torch.load(weights_only=True)` (nothing is
unpickled). A checkpoint is written under `.step-<N>.tmp` and renamed once every rank has finished,
so a directory named `step-<N>` is always complete; resuming picks the newest one automatically.
DCP reshards model and optimizer for any number of ranks; a rank the checkpoint did not have takes
rank 0's counters (its data position comes from trainer.data.pipeline.resume_generation, its RNG
starts fresh).
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

logger = logging.getLogger(__name__)

_STEP = re.compile(r"step-(\d+)")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    # numpy's key array as a list: the rank files hold only what torch.load(weights_only=True) reads.
    name, keys, *rest = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, keys.tolist(), *rest)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None; rank 0 decides for all (shared filesystems can
    show ranks different directory listings for a moment)."""
    root = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP.fullmatch(p.name)) and p.is_dir()]
    choice = [str(max(found)[1]) if found else None]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def _trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state of the trained parameters only: frozen weights come from the base
    checkpoint (a LoRA checkpoint holds the adapters, not 7B frozen weights, and QLoRA's packed
    4-bit tensors are not DCP material)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    trainable = {n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
                 for n, p in model.named_parameters() if p.requires_grad}
    model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    return model_sd, optim_sd


def save(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any], keep: int) -> Path:
    """Write step-<step> (collective: every rank calls it)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = _trainable_state(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({**extra, "rng": rng_state()}, tmp / f"rank{rank}.pt")
    _barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        old = sorted((int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP.fullmatch(p.name)))
        for _, p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    _barrier()
    return final


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG from `path`; returns this rank's extra state."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    model_sd, optim_sd = _trainable_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    # A fresh optimizer lists state for every trainable parameter; a saved one only for those that
    # ever had a gradient (LLaVA never uses its vision tower's last layer). The rest keep the fresh
    # zero state, which AdamW never touches while they get no gradient.
    dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    rank_file = path / f"rank{rank}.pt"
    if rank_file.exists():
        extra = torch.load(rank_file, weights_only=True)
        set_rng_state(extra.pop("rng"))
    else:
        logger.warning("%s has no rank%d.pt (it was written by %d ranks): this rank starts from rank 0's "
                       "counters and a fresh RNG", path, rank, saved_ranks(path))
        extra = torch.load(path / "rank0.pt", weights_only=True)
        extra.pop("rng")
    logger.info("resumed from %s", path)
    return extra


def saved_ranks(path: Path) -> int:
    """How many ranks wrote the checkpoint at `path`."""
    return len(list(path.glob("rank*.pt")))


def rank_extras(path: Path) -> list[dict[str, Any]]:
    """Every rank's extra state in the checkpoint at `path`, in rank order (without RNG states)."""
    extras = []
    for rank in range(saved_ranks(path)):
        extra = torch.load(path / f"rank{rank}.pt", weights_only=True)
        extra.pop("rng", None)
        extras.append(extra)
    return extras
