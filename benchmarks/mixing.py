"""How close the training order is to the intended mix, at 1 to 512 ranks; and what planning an epoch costs.

    python benchmarks/mixing.py [--ranks 1 8 64 512] [--workers 2] [--scale 1.0] [--seeds 5]

The mix (documented, synthetic): a LLaVA-OneVision-like epoch of 1M samples from 7 sources, in shards of
10,000 samples as shard.py writes them by default:

    source          valid   per epoch   sampling
    general_qa    300,000     300,000   all
    doc_chart     170,000     170,000   all
    math_reason   330,000     165,000   down x0.5
    ocr            75,000      75,000   all
    language      120,000     120,000   all (text-only)
    multi_image   100,000     100,000   all
    video          35,000      70,000   up x2

The order is the real one, without rendering: data_tools.plan's epoch plan, each (rank, worker) slice
read in its own order (`slice_ids`); a rank's loader takes packs from its workers in turn (torchdata's
round robin), each pack 11 samples (8,192 tokens of LLaVA-like samples); a global step is one pack of
every rank. The shuffle buffer and the packer only reorder samples within a worker, by a few thousand
samples at most, and are left out. For every world size one JSON line gives the total-variation distance
from the target mix of per-global-step windows and of 1 %-of-epoch windows, median and worst, each next
to an i.i.d. order's for windows of the same sizes (data_tools/mixing.py). The worst of 100 windows is
one draw of a noisy statistic, so both sides are the median over draws: over --seeds plan seeds for
mmloom's order, over 21 draws for the i.i.d. one. The last line times planning a
10M-occurrence epoch (the mix x10) as each worker does it at the start of an epoch: the plan, the split
over 1,024 slices and its own slice's order, with the peak memory numpy allocated (tracemalloc).

Bars: every ratio to i.i.d. <= 1.25; the 10M plan in < 5 s and < 1 GB.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.manifest import Manifest, ShardEntry, SourceEntry  # noqa: E402
from data_tools.mixing import compare, target_mix  # noqa: E402
from data_tools.plan import Generation, plan_epoch, slice_ids  # noqa: E402

MIX = [
    ("general_qa", 300_000, 300_000),
    ("doc_chart", 170_000, 170_000),
    ("math_reason", 330_000, 165_000),
    ("ocr", 75_000, 75_000),
    ("language", 120_000, 120_000),
    ("multi_image", 100_000, 100_000),
    ("video", 35_000, 70_000),
]
SHARD, PACK = 10_000, 11


def manifest(scale: float, seed: int = 0) -> Manifest:
    sources = []
    for name, valid, epoch in MIX:
        valid, epoch = int(valid * scale), int(epoch * scale)
        sizes = [SHARD] * (valid // SHARD) + ([valid % SHARD] if valid % SHARD else [])
        shards = [
            ShardEntry(path=f"{name}/{name}-{i:06d}.tar", samples=n, bytes=0, sha256="")
            for i, n in enumerate(sizes)
        ]
        sources.append(
            SourceEntry(
                name=name,
                path=f"{name}.json",
                samples=valid,
                epoch_samples=epoch,
                rejected=0,
                rejected_by_reason={},
                images=0,
                videos=0,
                text_chars=0,
                media_bytes=0,
                fingerprint="",
                shards=shards,
            )
        )
    return Manifest(seed=seed, converter="benchmark", sources=sources)


def training_order(m: Manifest, ranks: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(the source of every sample in global training order, the global step each belongs to)."""
    plan = plan_epoch(m, m.seed, 0)
    parts = ranks * workers
    sources, steps, ranks_of = [], [], []
    for rank in range(ranks):
        for worker in range(workers):
            _, order = slice_ids(plan, Generation(epoch=0), m.seed, rank * workers + worker, parts)
            # Pack k of this worker is the rank's micro-batch k * workers + worker (round robin).
            sources.append(order)
            steps.append(np.arange(len(order)) // PACK * workers + worker)
            ranks_of.append(np.full(len(order), rank))
    source, step, rank_of = np.concatenate(sources), np.concatenate(steps), np.concatenate(ranks_of)
    position = np.concatenate([np.arange(len(s)) for s in sources])
    by = np.lexsort((position, rank_of, step))  # step by step, rank by rank, in reading order
    return source[by], step[by]


def measure(scale: float, ranks: int, workers: int, seeds: int) -> dict:
    runs: dict[str, list[dict]] = {"step": [], "epoch_1pct": []}
    for seed in range(seeds):
        m = manifest(scale, seed)
        source, step = training_order(m, ranks, workers)
        target = target_mix([s.epoch_samples for s in m.sources])
        step_bounds = np.concatenate([[0], np.flatnonzero(np.diff(step)) + 1, [len(step)]])
        runs["step"].append(compare(source, target, step_bounds))
        runs["epoch_1pct"].append(compare(source, target, np.arange(101) * (len(source) // 100)))
    out = {
        "benchmark": "mixing",
        "ranks": ranks,
        "workers": workers,
        "samples": len(source),
        "seeds": seeds,
        "samples_per_step": int(np.median(np.diff(step_bounds))),
    }
    for name, results in runs.items():
        r = {k: float(np.median([x[k] for x in results])) for k in results[0]}
        out[name] = {
            **r,
            "median_vs_iid": round(r["median"] / r["iid_median"], 3),
            "worst_vs_iid": round(r["worst"] / r["iid_worst"], 3),
        }
    return out


def plan_cost(workers_total: int = 1024) -> dict:
    big = manifest(10.0)
    tracemalloc.start()
    start = time.perf_counter()
    plan = plan_epoch(big, big.seed, 0)
    slice_ids(plan, Generation(epoch=0), big.seed, workers_total // 2, workers_total)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "occurrences": len(plan),
        "slices": workers_total,
        "seconds": round(seconds, 2),
        "peak_gib": round(peak / 2**30, 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0, help="the mix's size: 0.1 for a quick run")
    p.add_argument("--seeds", type=int, default=5, help="plan seeds to take the median over")
    args = p.parse_args()
    worst = 0.0
    for ranks in args.ranks:
        line = measure(args.scale, ranks, args.workers, args.seeds)
        worst = max(
            worst, *(line[w][k] for w in ("step", "epoch_1pct") for k in ("median_vs_iid", "worst_vs_iid"))
        )
        print(json.dumps(line), flush=True)
    cost = plan_cost()
    print(
        json.dumps(
            {
                "benchmark": "mixing",
                "worst_ratio_to_iid": worst,
                "mix_bar_1_25": worst <= 1.25,
                "plan_10m": cost,
                "plan_bar_5s_1gib": cost["seconds"] < 5 and cost["peak_gib"] < 1,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
