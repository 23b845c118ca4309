"""Converter throughput and memory: prints one JSON line.

    python benchmarks/shard.py [--images 2000] [--text 1000000] [--workers 1 2]

Runs of the real CLI, each in a fresh process (MB/s are the converter's own figures, from the
start of its work including the pass that reads every JSON first; `_wall` adds process start-up):
- media: a LLaVA-style JSON whose samples each name one already-encoded JPEG (real photographs
  from scikit-learn / scikit-image, re-encoded at several sizes so the bytes differ), converted
  with 1 and 2 workers: MB/s of media in total and per worker, samples/s;
- text: a text-only JSONL of `--text` samples: samples/s and the converter's peak RSS, which
  must not grow with the file (it streams).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_images(root: Path, n: int) -> list[Path]:
    from PIL import Image

    from data_tools.samples import SKIMAGE, SKLEARN

    bases = [
        Image.open(p).convert("RGB")
        for p in (
            SKLEARN / "china.jpg",
            SKLEARN / "flower.jpg",
            SKIMAGE / "astronaut.png",
            SKIMAGE / "coffee.png",
        )
    ]
    paths = []
    for i in range(n):
        img = bases[i % len(bases)]
        side = 480 + (i * 37) % 320  # COCO-like sizes, 480-800 px
        img = img.resize((side, side * img.height // img.width))
        path = root / f"img_{i:06d}.jpg"
        img.save(path, quality=80 + i % 15)
        paths.append(path)
    return paths


def run_cli(data_txt: Path, out: Path, workers: int) -> tuple[float, float, dict, int]:
    """(wall seconds, the converter's own seconds, manifest, peak RSS of the converter in bytes).

    The converter's own time starts after the interpreter and imports are up and includes the
    pass that reads every JSON file first; wall time includes process start-up too."""
    cmd = [
        sys.executable,
        str(REPO / "data_tools" / "shard.py"),
        str(data_txt),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "-q",
        "--force",
    ]
    start = time.perf_counter()
    # Measured in a child so ru_maxrss is the converter's own peak, workers included.
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    res = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    own = float(re.search(r" in ([\d.]+) s: ", res.stdout).group(1))
    rss = int(res.stdout.split()[-1]) * 1024
    return wall, own, json.loads((out / "manifest.json").read_text()), rss


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--text", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    result: dict = {"benchmark": "shard", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = make_images(root, args.images)
        with open(root / "media.json", "w") as f:
            json.dump(
                [
                    {
                        "id": str(i),
                        "image": p.name,
                        "conversations": [
                            {"from": "human", "value": "<image>\nDescribe the image."},
                            {"from": "gpt", "value": "A photograph used to measure the converter."},
                        ],
                    }
                    for i, p in enumerate(images)
                ],
                f,
            )
        (root / "media.txt").write_text("media.json 1\n")
        mb = sum(p.stat().st_size for p in images) / 1e6
        result["media_mb"] = round(mb, 1)
        for w in args.workers:
            wall, own, manifest, _ = run_cli(root / "media.txt", root / f"out{w}", w)
            assert manifest["sources"][0]["samples"] == args.images
            result[f"media_mb_per_s_{w}w"] = round(mb / own, 1)
            result[f"media_mb_per_s_per_worker_{w}w"] = round(mb / own / w, 1)
            result[f"media_samples_per_s_{w}w"] = round(args.images / own, 1)
            result[f"media_mb_per_s_{w}w_wall"] = round(mb / wall, 1)

        line = (
            json.dumps(
                {
                    "id": "x",
                    "conversations": [
                        {"from": "human", "value": "What is the capital of France? Answer briefly."},
                        {"from": "gpt", "value": "Paris is the capital and largest city of France."},
                    ],
                }
            )
            + "\n"
        )
        with open(root / "text.jsonl", "w") as f:
            for i in range(args.text):
                f.write(line.replace('"x"', f'"{i}"'))
        (root / "text.txt").write_text(f"text.jsonl {args.text / 1000}\n")
        jsonl_mb = (root / "text.jsonl").stat().st_size / 1e6
        workers = max(args.workers)
        _, own, manifest, rss = run_cli(root / "text.txt", root / "out_text", workers)
        assert manifest["sources"][0]["samples"] == args.text
        result.update(
            text_samples=args.text,
            text_jsonl_mb=round(jsonl_mb, 1),
            **{f"text_samples_per_s_{workers}w": round(args.text / own)},
            text_peak_rss_mb=round(rss / 1e6),
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
