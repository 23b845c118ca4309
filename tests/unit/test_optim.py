"""The LR schedule: linear warmup by steps, then cosine or linear decay by the fraction of the run done."""

from __future__ import annotations

import math

import pytest

from trainer.config import OptimConfig
from trainer.optim import lr_factor, step_progress


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_then_decay_to_the_floor(schedule: str) -> None:
    cfg = OptimConfig(schedule=schedule, warmup_steps=4, min_lr_ratio=0.1)
    total = 20
    factors = [lr_factor(s, step_progress(s, total, cfg), cfg) for s in range(total)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    after = factors[4:]
    assert all(a >= b for a, b in zip(after, after[1:]))
    if schedule == "constant":
        assert set(after) == {1.0}
    else:
        assert after[0] == 1.0 and lr_factor(total, 1.0, cfg) == pytest.approx(0.1)
        mid = lr_factor(12, 0.5, cfg)
        assert mid == pytest.approx(
            0.1 + 0.9 * (0.5 if schedule == "linear" else 0.5 * (1 + math.cos(math.pi / 2)))
        )


def test_progress_outside_the_run_is_clamped() -> None:
    cfg = OptimConfig(schedule="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(0, -0.5, cfg) == 1.0 and lr_factor(99, 1.7, cfg) == pytest.approx(0.0)
