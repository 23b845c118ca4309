"""Packing efficiency on a LLaVA-665K-like length mix, against padded batches: one JSON line.

    python benchmarks/packing.py [--samples 100000] [--buffer 128]

The mix (documented, synthetic, seeded): 88% of samples carry one image of 576 tokens (LLaVA-1.5
at 336 px) plus a prompt/answer whose text length is log-normal (median ~75 tokens, a heavy tail
of long multi-turn conversations, capped at 4000 tokens in all); 12% are text-only conversations
three times as long. Efficiency = real tokens / token slots. Baselines, as the seeds batch:
padded batches of 8 in random order, and in length-grouped order (sorted within windows of 64
batches, like `group_by_length`), each batch padded to its longest sample.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def llava_like_mix(n: int, seed: int = 0) -> list[tuple[int, bool]]:
    """(tokens, has an image) of `n` samples of the mix in the module docstring."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = int(rng.lognormvariate(4.3, 0.9))
        out.append(
            (min(4000, 20 + text * 3), False) if rng.random() < 0.12 else (min(4000, 576 + 40 + text), True)
        )
    return out


def llava_like_lengths(n: int, seed: int = 0) -> list[int]:
    return [length for length, _ in llava_like_mix(n, seed)]


def packed_efficiency(mix: list[tuple[int, bool]], max_tokens: int, buffer: int) -> tuple[float, float]:
    """(efficiency, seconds) of mmloom's packer over these (length, has an image) samples."""
    from types import SimpleNamespace

    from trainer.data.packing import Packer

    # The packer reads only .length and whether .media is empty.
    items = [SimpleNamespace(length=n, media={"pixel_values": None} if image else {}) for n, image in mix]
    lengths = [n for n, _ in mix]
    packer, packs = Packer(max_tokens, buffer), 0
    start = time.perf_counter()
    for item in items:
        packs += sum(1 for _ in packer.add(item))
    packs += sum(1 for _ in packer.flush())
    return sum(lengths) / (packs * max_tokens), time.perf_counter() - start


def padded_efficiency(lengths: list[int], batch: int, grouped: bool, seed: int = 0) -> float:
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    if grouped:
        window = batch * 64
        order = [
            i
            for w in range(0, len(order), window)
            for i in sorted(order[w : w + window], key=lambda i: -lengths[i])
        ]
    slots = sum(
        max(lengths[i] for i in order[b : b + batch]) * len(order[b : b + batch])
        for b in range(0, len(order), batch)
    )
    return sum(lengths) / slots


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--buffer", type=int, default=128)
    args = p.parse_args()
    mix = llava_like_mix(args.samples)
    lengths = [n for n, _ in mix]
    result = {
        "benchmark": "packing",
        "samples": args.samples,
        "mean_tokens": round(sum(lengths) / len(lengths), 1),
        "buffer": args.buffer,
    }
    for max_tokens in (4096, 8192):
        eff, seconds = packed_efficiency(mix, max_tokens, args.buffer)
        result[f"packing_efficiency_{max_tokens}"] = round(eff, 4)
        result[f"packer_s_per_1m_samples_{max_tokens}"] = round(seconds * 1e6 / len(lengths), 2)
    result["padded_bs8_random"] = round(padded_efficiency(lengths, 8, grouped=False), 4)
    result["padded_bs8_length_grouped"] = round(padded_efficiency(lengths, 8, grouped=True), 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
