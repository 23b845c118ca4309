"""All metrics go through here to tensorboard (rank 0 writes), tags grouped by prefix. The tags logged:

    train/loss                      mean loss per target token of the step, over all ranks
    train/grad_norm                 global gradient norm before clipping
    train/lr/<group>                learning rate of each optimizer group (llm, projector/no_decay, ...)
    train/loss_by_source/<source>   mean loss per target token of each source in the step's packs
    train/router_aux_loss           mixture of experts: the step's router load-balancing loss, before
                                    its coefficient (trainer/moe.py)
    moe/layer_NN/tokens_min|max     tokens of the step (all ranks) routed to MoE layer NN's least and
                                    most loaded expert
    perf/tokens_per_s               tokens of all ranks per second of the step, its data wait included
    perf/samples_per_s              samples likewise
    perf/model_tflops_per_s         model FLOPs of the step (trainer/flops.py, counted from its packs),
                                    over all ranks, per rank and second
    perf/mfu                        that over the device's dense bf16 peak (known GPUs or
                                    train.peak_tflops); not logged where neither gives one
    data/wait_fraction              the share of the step spent waiting for packs
    data/packing_efficiency         tokens over the packs' token budget (data.packing.max_tokens)
    data/skipped                    samples this rank skipped so far this epoch, all reasons
    mem/peak_gib                    peak GPU memory allocated, or on CPU the process's peak RSS
    eval/loss                       mean loss per target token of an eval pass (trainer/loop.py)
    ckpt/save_blocking_s            training waited this long for a save (trainer/checkpoint.py)
    ckpt/save_total_s               until the checkpoint was written, at the checkpoint's step

The train/, perf/, data/ and mem/ scalars of a step are assembled by `step_scalars` from `StepStats`.
"""

from __future__ import annotations

import dataclasses
import resource
from pathlib import Path

import torch


class Metrics:
    def __init__(self, log_dir: str | Path, enabled: bool, purge_step: int | None = None) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # Same directory across restarts: a resumed run continues the same curves.
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclasses.dataclass(kw_only=True)
class StepStats:
    """What one optimizer step measured: the inputs of its scalars (over all ranks unless noted)."""

    loss: float  # mean loss per target token
    grad_norm: float
    lrs: dict[str, float]  # learning rate per parameter group name
    tokens: float
    samples: float
    budget: int  # token slots the step's packs had: packs x ranks x max_tokens
    seconds: float  # this rank's wall time for the step, the wait for data included
    wait: float  # of which waiting for packs
    flops: float  # model FLOPs of the step
    world: int
    by_source: list[tuple[str, float, float]]  # (source name, summed token loss, target tokens)
    skipped: int | None = None  # samples this rank skipped this epoch; None outside an epoch's batches
    peak_tflops: float | None = None  # the device's dense bf16 peak, where known


def step_scalars(stats: StepStats) -> dict[str, float]:
    """The tensorboard scalars of one step, by tag."""
    elapsed = stats.seconds
    values = {
        "train/loss": stats.loss,
        "train/grad_norm": stats.grad_norm,
        "perf/tokens_per_s": stats.tokens / elapsed,
        "perf/samples_per_s": stats.samples / elapsed,
        "data/wait_fraction": stats.wait / elapsed,
        "data/packing_efficiency": stats.tokens / stats.budget,
    }
    for group, lr in stats.lrs.items():
        values[f"train/lr/{group}"] = lr
    if stats.skipped is not None:
        values["data/skipped"] = stats.skipped
    for name, loss_sum, targets in stats.by_source:
        if targets:  # a source with no sample in the step has no loss to show
            values[f"train/loss_by_source/{name}"] = loss_sum / targets
    values["perf/model_tflops_per_s"] = stats.flops / (elapsed * stats.world) / 1e12  # per rank
    if stats.peak_tflops:
        values["perf/mfu"] = values["perf/model_tflops_per_s"] / stats.peak_tflops
    values["mem/peak_gib"] = peak_memory_gib()
    return values


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by this process; on CPU its peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
