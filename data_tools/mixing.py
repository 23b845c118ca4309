"""How close the order in which samples reach the model is to the intended mix.

Each window of consecutive samples (1 % of the epoch, or one global step) has a source mix; its
total-variation distance from the epoch's target mix is half the sum of absolute differences of the
proportions. The reference is an i.i.d. order, each sample's source drawn from the target mix: what the
random samplers of LLaVA, lmms-finetune, MiniCPM-V and InternLM-XComposer's shuffled per-epoch draws give.

    report = mix_report(sources_in_training_order, target, window=len(order) // 100)
    # {"window": 10000, "windows": 100, "median": 0.004, "worst": 0.011,
    #  "iid_median": 0.005, "iid_worst": 0.012}
"""

from __future__ import annotations

from typing import Any

import numpy as np


def distances(labels: Any, target: Any, bounds: Any) -> np.ndarray:
    """TV distance from `target` (proportions per source) of the mix of each window
    labels[bounds[i]:bounds[i + 1]] (labels: the source index of each sample, in order)."""
    labels, target, bounds = np.asarray(labels), np.asarray(target, dtype=np.float64), np.asarray(bounds)
    sizes = np.diff(bounds)
    window = np.repeat(np.arange(len(sizes)), sizes)
    counts = np.zeros((len(sizes), len(target)))
    np.add.at(counts, (window, labels[bounds[0] : bounds[-1]]), 1)
    return 0.5 * np.abs(counts / np.maximum(sizes, 1)[:, None] - target).sum(1)


def iid_distances(target: Any, sizes: Any, seed: int = 0) -> np.ndarray:
    """The same for windows of these sizes of an i.i.d. order."""
    target = np.asarray(target, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    counts = np.random.default_rng(seed).multinomial(sizes, target / target.sum())
    return 0.5 * np.abs(counts / np.maximum(sizes, 1)[:, None] - target).sum(1)


def compare(labels: Any, target: Any, bounds: Any, repeats: int = 21) -> dict[str, float]:
    """Median and worst distance of these windows, and the i.i.d. order's for windows of the same sizes
    (the median over `repeats` draws, so that the reference is steady)."""
    d = distances(labels, target, bounds)
    sizes = np.diff(np.asarray(bounds))
    iid = [iid_distances(target, sizes, seed) for seed in range(repeats)]
    return {
        "windows": len(d),
        "median": round(float(np.median(d)), 5),
        "worst": round(float(d.max()), 5),
        "iid_median": round(float(np.median([np.median(x) for x in iid])), 5),
        "iid_worst": round(float(np.median([x.max() for x in iid])), 5),
    }


def mix_report(labels: Any, target: Any, window: int) -> dict[str, float]:
    """`compare` over consecutive full windows of `window` samples."""
    window = max(1, window)
    n = len(labels) // window
    return {"window": window, **compare(labels, target, np.arange(n + 1) * window)}


def target_mix(epoch_samples: list[int]) -> np.ndarray:
    total = sum(epoch_samples)
    return np.asarray(epoch_samples, dtype=np.float64) / max(total, 1)
