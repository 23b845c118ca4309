"""trainer.metrics.step_scalars: the scalars of one step from what it measured, by hand-computed
values, and every tag it logs is listed in the module docstring."""

from __future__ import annotations

import pytest

import trainer.metrics
from trainer.metrics import StepStats, step_scalars


def stats(**changes) -> StepStats:
    base = dict(
        loss=1.5,
        grad_norm=0.25,
        lrs={"llm": 1e-4, "projector/no_decay": 2e-4},
        tokens=3000.0,
        samples=12.0,
        budget=2 * 2 * 2048,
        seconds=2.0,
        wait=0.5,
        flops=8e12,
        world=2,
        by_source=[("chat", 30.0, 20.0), ("ocr", 0.0, 0.0), ("video", 9.0, 3.0)],
        skipped=4,
        peak_tflops=1.0,
    )
    return StepStats(**{**base, **changes})


def test_step_scalars() -> None:
    values = step_scalars(stats())
    assert values.pop("mem/peak_gib") > 0
    assert values == {
        "train/loss": 1.5,
        "train/grad_norm": 0.25,
        "perf/tokens_per_s": 1500.0,
        "perf/samples_per_s": 6.0,
        "data/wait_fraction": 0.25,
        "data/packing_efficiency": 3000 / 8192,
        "train/lr/llm": 1e-4,
        "train/lr/projector/no_decay": 2e-4,
        "data/skipped": 4,
        "train/loss_by_source/chat": 1.5,
        "train/loss_by_source/video": 3.0,  # no ocr sample
        "perf/model_tflops_per_s": 2.0,
        "perf/mfu": 2.0,
    }


def test_without_a_peak_or_an_epoch_no_mfu_and_no_skips() -> None:
    values = step_scalars(stats(peak_tflops=None, skipped=None))
    assert "perf/mfu" not in values and "data/skipped" not in values


@pytest.mark.parametrize("tag", sorted(step_scalars(stats())))
def test_the_docstring_lists_each_tag(tag: str) -> None:
    doc = trainer.metrics.__doc__
    group = tag.split("/")[0] + "/" + tag.split("/")[1]
    assert f" {tag} " in doc or f" {group}/<" in doc, tag
