"""A LLaVA-665K-like conversation set over real photographs, shared by the loader and GPU benchmarks.

    records = llava_like_records(2000, images)          # LLaVA JSON records naming image files

The mix (synthetic, seeded, meant to resemble LLaVA-1.5's 665K instruction mix, not measured from
it): 88% of samples show one photograph and ask about it, 12% are text-only. A sample has one
question/answer round and each further one with probability 0.45 (mean 1.8 rounds, at most 10).
60% of answers are VQA-style (1-3 words, the question ending "Answer the question using a single
word or phrase."), the rest free-form with a log-normal word count (median 40 words, a heavy tail
capped at 400); text-only samples' free-form answers are three times longer. The photographs are
real ones from scikit-learn / scikit-image re-encoded as JPEG at COCO-like sizes (480-800 px on the
long side, see benchmarks/shard.py: make_images).
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the cat dog man woman child bird car train boat horse chart table sits on looks at stands near "
    "runs past shows holds is behind next to a red box green field two people old house blue sky "
    "screen small cup open window three apples what color where how many picture left right front "
    "of with and in by street building tree water person wearing shirt white black sign"
).split()
VQA_HINT = "Answer the question using a single word or phrase."


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def _round(rng: random.Random, scale: int) -> tuple[str, str]:
    """(question, answer) of one round."""
    question = _words(rng, rng.randint(6, 15)).capitalize() + "?"
    if rng.random() < 0.6:
        return f"{question}\n{VQA_HINT}", _words(rng, rng.randint(1, 3)).capitalize() + "."
    return question, _words(rng, min(400, int(rng.lognormvariate(3.7, 0.8)) * scale)).capitalize() + "."


def llava_like_records(n: int, images: list[Path], seed: int = 0, image_share: float = 0.88) -> list[dict]:
    """`n` LLaVA-format records; image samples name `images` (file names) in turn. With
    `image_share=0` (and no images), the text-only part of the mix alone."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        has_image = rng.random() < image_share
        rounds = 1
        while rounds < 10 and rng.random() < 0.45:
            rounds += 1
        conv = []
        for r in range(rounds):
            question, answer = _round(rng, 1 if has_image else 3)
            if has_image and r == 0:
                question = "<image>\n" + question
            conv.append({"from": "human", "value": question})
            conv.append({"from": "gpt", "value": answer})
        record = {"id": f"s{i}", "conversations": conv}
        if has_image:
            record["image"] = images[i % len(images)].name
        records.append(record)
    return records
