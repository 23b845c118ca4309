"""A small real shard set for pipeline tests: three sources (up-, down- and exactly sampled),
real photographs and text-only samples, many small shards (one of them empty of planned
samples most epochs), written by the real converter."""

from __future__ import annotations

import json
from pathlib import Path

from data_tools.samples import PHOTOS
from data_tools.shard import main as shard_main


def build_shards(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    images = [
        {
            "id": f"img{i}",
            "image": str(PHOTOS[i % len(PHOTOS)]),
            "conversations": [
                {"from": "human", "value": f"<image>\nDescribe picture {i}."},
                {"from": "gpt", "value": "It shows " + "something " * (1 + i % 5) + f"({i})."},
            ],
        }
        for i in range(12)
    ]
    text = [
        {
            "id": f"txt{i}",
            "conversations": [
                {"from": "human", "value": f"What is {i} + {i}?"},
                {"from": "gpt", "value": f"{2 * i}."},
                {"from": "human", "value": "And times two?" * (1 + i % 3)},
                {"from": "gpt", "value": f"{4 * i}."},
            ],
        }
        for i in range(40)
    ]
    mixed = [
        {
            "id": f"mix{i}",
            "system_prompt": "Be brief.",
            "image": str(PHOTOS[(i + 1) % len(PHOTOS)]),
            "conversations": [
                {"from": "human", "value": f"Question {i}? <image>"},
                {"from": "gpt", "value": f"Answer {i}."},
            ],
        }
        for i in range(9)
    ]
    (root / "images.json").write_text(json.dumps(images))
    (root / "text.jsonl").write_text("\n".join(json.dumps(r) for r in text))
    (root / "mixed.json").write_text(json.dumps(mixed))
    (root / "data.txt").write_text("images.json 0.024\ntext.jsonl 0.025\nmixed.json 0.009\n")
    out = root / "shards"
    assert (
        shard_main(
            [str(root / "data.txt"), "--out", str(out), "--workers", "1", "--shard-samples", "5", "-q"]
        )
        == 0
    )
    return out


def build_mix_shards(root: Path) -> Path:
    """Three text-only sources at 50 / 25 / 25 % of a 1,200-sample epoch, each JSONL written sorted by
    answer length (as a JSON sorted by task, length or date is), in shards of 100 samples."""
    root.mkdir(parents=True, exist_ok=True)
    counts = {"long": 600, "mid": 300, "short": 300}
    for name, n in counts.items():
        records = [
            {
                "id": f"{name}{i}",
                "conversations": [
                    {"from": "human", "value": f"Tell me about {name} item {i}."},
                    {"from": "gpt", "value": " ".join(["word"] * (1 + i * 40 // n))},
                ],
            }
            for i in range(n)
        ]
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (root / "data.txt").write_text("".join(f"{name}.jsonl {n / 1000}\n" for name, n in counts.items()))
    out = root / "shards"
    assert (
        shard_main(
            [str(root / "data.txt"), "--out", str(out), "--workers", "1", "--shard-samples", "100", "-q"]
        )
        == 0
    )
    return out
