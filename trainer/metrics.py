"""All metrics go through here to tensorboard (rank 0 writes), tags grouped by prefix:
train/loss, train/lr/<group>, train/grad_norm, perf/tokens_per_s, perf/samples_per_s,
perf/model_tflops_per_s (model FLOPs of the step counted from its packs by trainer/flops.py, over
all ranks, per rank and second), perf/mfu (that over the device's dense bf16 peak: known GPUs or
train.peak_tflops), data/packing_efficiency, data/wait_fraction, data/skipped/<reason>,
mem/peak_gib, eval/loss, ckpt/save_blocking_s (training waited), ckpt/save_total_s (until written,
at the checkpoint's step)."""

from __future__ import annotations

from pathlib import Path


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
