"""Streaming pipeline throughput against the seeds' map-style loader: prints one JSON line.

    python benchmarks/loader.py [--samples 2000] [--workers 2] [--trials 3]

The data is the LLaVA-665K-like mix of benchmarks/corpus.py (real photographs as 480-800 px
JPEGs, 12% text-only, multi-turn). The processor is a tiny LLaVA-1.5 checkpoint's (the real
CLIP-336 image processor and chat format, 576 tokens per image). Both loaders use the same
number of dataloader workers:

- mmloom: the JSON converted once by data_tools/shard.py, then build_loader (epoch plan, tar
  reads, shuffle buffer, render through the processor's chat template, pack into
  data.packing.max_tokens=8192) iterated through EpochBatches as the trainer does, with the
  default data settings;
- baseline, as the seeds load (lmms-finetune's datasets.py and collators): a map-style torch
  Dataset holding the JSON list; per sample it opens the image file with PIL, and the
  processor's `apply_chat_template(tokenize=True, return_assistant_tokens_mask=True)` gives the
  input ids, the pixels and the answer mask; a plain DataLoader (default fork workers, shuffled,
  batches of 8) pads each batch to its longest sample (lmms-finetune pads to model_max_length,
  which costs more);
- baseline_tuned: the same loader with labelling faster than any seed's, written for this
  benchmark: the processor once on the rendered conversation with its image, the answer spans
  from the token counts of each conversation prefix. It does the least work a loader of these
  samples can do, so it bounds what any loader gains from rendering alone.

Both baselines' samples are token-for-token and pixel-for-pixel mmloom's
(tests/unit/test_benchmarks.py checks it).
- decode_only: mmloom's shard reads and image decodes with nothing rendered, the ceiling of
  any loader on this machine.

Throughput is samples delivered to the training process per second in steady state (while the
20th to the 80th percent of the epoch's samples arrive); `_wall` figures cover the whole epoch,
worker start-up included, and `startup_s` is the wait for the first batch (mmloom's workers are
spawned, the baselines' forked). Each trial runs the four in turn; every figure is the median
over trials, the speedups the median of the per-trial ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

BATCH = 8  # the seeds' per-device batch size in the padded baseline


# --- the data ---------------------------------------------------------------------------------


def build_data(root: Path, samples: int, images: int) -> tuple[Path, Path, Path]:
    """(LLaVA JSON, shards directory, tiny LLaVA checkpoint) under `root`."""
    from benchmarks.corpus import llava_like_records
    from benchmarks.shard import make_images
    from data_tools.shard import main as shard_main
    from trainer.tiny import build_tiny

    media = root / "media"
    media.mkdir(parents=True)
    paths = make_images(media, min(samples, images))
    records = llava_like_records(samples, paths)
    json_path = media / "llava_like.json"
    json_path.write_text(json.dumps(records))
    (root / "data.txt").write_text(f"{json_path} {samples / 1000}\n")
    shards = root / "shards"
    assert shard_main([str(root / "data.txt"), "--out", str(shards), "--workers", "1", "-q"]) == 0
    return json_path, shards, build_tiny("llava", root / "tiny-llava")


# --- a run and its timeline --------------------------------------------------------------------


def measure(batches: Iterable[int], total: int) -> dict[str, float]:
    """Time an iteration of per-batch sample counts: startup, steady-state and wall samples/s."""
    start = time.perf_counter()
    times, counts, seen = [], [], 0
    for n in batches:
        seen += n
        times.append(time.perf_counter() - start)
        counts.append(seen)
    assert seen == total, f"{seen} samples delivered, {total} expected"
    a = next(i for i, c in enumerate(counts) if c >= 0.2 * total)
    b = next(i for i, c in enumerate(counts) if c >= 0.8 * total)
    steady = (counts[b] - counts[a]) / (times[b] - times[a]) if b > a else total / times[-1]
    return {"samples_per_s": steady, "samples_per_s_wall": total / times[-1], "startup_s": times[0]}


def mmloom_batches(shards: Path, model: Path, workers: int) -> Iterator[int]:
    from trainer.config import load_config
    from trainer.data.pipeline import EpochBatches, build_loader
    from trainer.models.registry import adapter_for

    cfg = load_config(None, [f"model.path={model}", f"data.shards={shards}", f"data.workers={workers}"])
    adapter = adapter_for(cfg.model)
    loader = build_loader(cfg.data, adapter, cfg.train.seed)
    loader.dataset.set_epoch(0)
    batches = EpochBatches(loader, adapter, max_skip_fraction=0.0)
    for pack in batches:
        yield len(pack.sources)


class SeedStyleDataset(Dataset):
    """The seeds' loader: the JSON list in memory; per sample, PIL opens the image file and the
    processor turns the conversation into input ids, pixels and labels.

    `labels="seed"` labels as lmms-finetune's collators (collators/llava_1_5.py) do, through the
    processor's apply_chat_template(tokenize=True, return_assistant_tokens_mask=True). They pass
    image placeholders and run the image processor separately; transformers 5 refuses image tokens
    without their images, so the images go into the call. `labels="tuned"` is faster than any seed:
    the processor once on the rendered conversation with its images, and the labels from the token
    counts of each conversation prefix (through the generation prompt, then through the answer)."""

    def __init__(self, json_path: Path, model: Path, labels: str = "seed") -> None:
        from transformers import AutoProcessor

        self.records = json.loads(json_path.read_text())
        self.root = json_path.parent
        self.processor = AutoProcessor.from_pretrained(model, local_files_only=True)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.records)

    @staticmethod
    def messages(rec: dict, image: Any) -> list[dict]:
        messages = []
        for turn in rec["conversations"]:
            text = turn["value"]
            content = []
            if "<image>" in text:
                content.append({"type": "image", "image": image})
                text = text.replace("<image>\n", "").replace("<image>", "")
            content.append({"type": "text", "text": text})
            messages.append({"role": "user" if turn["from"] == "human" else "assistant", "content": content})
        return messages

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        rec = self.records[i]
        image = Image.open(self.root / rec["image"]).convert("RGB") if "image" in rec else None
        return self.seed_item(rec, image) if self.labels == "seed" else self.tuned_item(rec, image)

    def seed_item(self, rec: dict, image: Any) -> dict[str, torch.Tensor]:
        out = self.processor.apply_chat_template(
            self.messages(rec, image),
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            return_assistant_tokens_mask=True,
        )
        ids = out["input_ids"][0]
        item = {
            "input_ids": ids,
            "labels": torch.where(torch.as_tensor(out["assistant_masks"][0]).bool(), ids, -100),
        }
        if "pixel_values" in out:
            item["pixel_values"] = out["pixel_values"]
        return item

    def tuned_item(self, rec: dict, image: Any) -> dict[str, torch.Tensor]:
        proc = self.processor
        messages = self.messages(rec, image)
        text = proc.apply_chat_template(messages, tokenize=False)
        out = proc(text=[text], images=[image] if image is not None else None, return_tensors="pt")
        ids = out["input_ids"][0]
        # Each image placeholder expands to a fixed number of tokens (LLaVA-1.5: 576).
        tokenize = proc.tokenizer
        expand = (len(ids) - len(tokenize(text)["input_ids"])) // max(1, text.count("<image>"))

        def count(prefix: str) -> int:
            return len(tokenize(prefix)["input_ids"]) + expand * prefix.count("<image>")

        labels = torch.full_like(ids, -100)
        for a, m in enumerate(messages):
            if m["role"] == "assistant":
                start = count(
                    proc.apply_chat_template(messages[:a], tokenize=False, add_generation_prompt=True)
                )
                end = count(proc.apply_chat_template(messages[: a + 1], tokenize=False))
                labels[start:end] = ids[start:end]
        item = {"input_ids": ids, "labels": labels}
        if "pixel_values" in out:
            item["pixel_values"] = out["pixel_values"]
        return item


def pad_collate(items: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample of the batch (the seeds' collator)."""
    longest = max(len(x["input_ids"]) for x in items)
    batch = {
        "input_ids": torch.full((len(items), longest), pad_id),
        "labels": torch.full((len(items), longest), -100),
        "attention_mask": torch.zeros((len(items), longest), dtype=torch.int64),
    }
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        batch["input_ids"][row, :n] = x["input_ids"]
        batch["labels"][row, :n] = x["labels"]
        batch["attention_mask"][row, :n] = 1
    pixels = [x["pixel_values"] for x in items if "pixel_values" in x]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def baseline_batches(json_path: Path, model: Path, workers: int, labels: str = "seed") -> Iterator[int]:
    dataset = SeedStyleDataset(json_path, model, labels)
    collate = functools.partial(pad_collate, pad_id=dataset.processor.tokenizer.pad_token_id)
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    for batch in loader:
        yield batch["input_ids"].shape[0]


class DecodeOnly(IterableDataset):
    """mmloom's reads of this worker's slice of the epoch plan, every image decoded, nothing rendered."""

    def __init__(self, shards: Path) -> None:
        self.shards = shards

    def __iter__(self) -> Iterator[int]:
        from data_tools.manifest import load_manifest
        from data_tools.plan import Generation, plan_epoch, slice_ids
        from data_tools.sample import Sample
        from trainer.data.pipeline import plan_seed
        from trainer.data.reader import RawSample, read_slice
        from trainer.data.render import decode_image

        info = get_worker_info()
        part, parts = (info.id, info.num_workers) if info is not None else (0, 1)
        manifest = load_manifest(self.shards)
        seed = plan_seed(manifest, 0)
        plan = plan_epoch(manifest, seed, 0)
        n = 0
        for raw in read_slice(self.shards, plan, *slice_ids(plan, Generation(epoch=0), seed, part, parts)):
            assert isinstance(raw, RawSample)
            for part_ in Sample.from_json(raw.members["json"]).media:
                decode_image(raw.members[part_.member]).load()
            n += 1
            if n == 16:
                yield n
                n = 0
        if n:
            yield n


def decode_batches(shards: Path, workers: int) -> Iterator[int]:
    yield from DataLoader(DecodeOnly(shards), batch_size=None, num_workers=workers)


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument(
        "--images", type=int, default=1000, help="distinct image files (samples cycle through them)"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--trials", type=int, default=3)
    args = p.parse_args()
    runs: dict[str, list[dict[str, float]]] = {
        "mmloom": [],
        "baseline": [],
        "baseline_tuned": [],
        "decode_only": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        json_path, shards, model = build_data(Path(tmp), args.samples, args.images)
        loaders = {
            "mmloom": lambda: mmloom_batches(shards, model, args.workers),
            "baseline": lambda: baseline_batches(json_path, model, args.workers),
            "baseline_tuned": lambda: baseline_batches(json_path, model, args.workers, labels="tuned"),
            "decode_only": lambda: decode_batches(shards, args.workers),
        }
        for _ in range(args.trials):
            for name, batches in loaders.items():
                runs[name].append(measure(batches(), args.samples))

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    result = {
        "benchmark": "loader",
        "samples": args.samples,
        "workers": args.workers,
        "trials": args.trials,
        "cpus": os.cpu_count(),
    }
    for name in runs:
        result[f"{name}_samples_per_s"] = round(med(name, "samples_per_s"), 1)
        result[f"{name}_samples_per_s_wall"] = round(med(name, "samples_per_s_wall"), 1)
        result[f"{name}_startup_s"] = round(med(name, "startup_s"), 2)
    # Per-trial ratios, so a load spike during one pair does not skew the figure.
    ratios = [m["samples_per_s"] / b["samples_per_s"] for m, b in zip(runs["mmloom"], runs["baseline"])]
    walls = [
        m["samples_per_s_wall"] / b["samples_per_s_wall"] for m, b in zip(runs["mmloom"], runs["baseline"])
    ]
    tuned = [m["samples_per_s"] / b["samples_per_s"] for m, b in zip(runs["mmloom"], runs["baseline_tuned"])]
    result["loader_speedup_vs_baseline"] = round(statistics.median(ratios), 3)
    result["loader_speedup_vs_baseline_wall"] = round(statistics.median(walls), 3)
    result["loader_speedup_vs_tuned_baseline"] = round(statistics.median(tuned), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
