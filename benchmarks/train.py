"""Training throughput on CPU: packed micro-batches against padded batches of the same samples,
and the framework's own overhead per step. Prints one JSON line.

    python benchmarks/train.py [--samples 96] [--max-tokens 8192] [--trials 3]

The model is a tiny random-weight LLaVA-1.5 (trainer/tiny: the real CLIP-336 vision tower
geometry and 576 tokens per image, 2 layers of width 64) loaded as the trainer loads it
(fp32, the attention implementation `adapter.attn_implementation()` picks: on CPU trainer/attention.py's
per-sample SDPA for packed rows; the vision
tower frozen, projector and language model trained, as finetune.* defaults to). The
samples follow the LLaVA-665K-like length mix of benchmarks/packing.py (88% carry one 336-px
image, random pixels; token ids random). Each micro-batch is one optimizer step (summed token
cross-entropy over the labelled tokens / their count, backward, clip, AdamW), the same code for:

- packed: mmloom's Packer (`--max-tokens`, buffer 128) and collate, loss by trainer.loop's
  micro_batch_loss (which projects onto the vocabulary only the positions that predict a target);
- padded: batches of 8 in random order (the seeds' default), right-padded to their longest
  sample with an attention mask, logits at every position as transformers' models compute them
  for a loss; `padded_grouped`: the same, length-grouped (sorted within windows of 64 batches,
  like `group_by_length`).

- packed_masked_row: the packed micro-batches again with plain SDPA over the whole packed row and
  its block-diagonal mask (what transformers does with packed position ids without flash-attn,
  and what the trainer did before trainer/attention.py). The loss is checked equal.

Useful tokens are the samples' own tokens (image tokens included, padding and the grey image a
text-only pack carries excluded); useful tokens/s = useful tokens / time of all the steps.
`attention_pairs_per_token`: causal query-key pairs per useful token within each attention call:
the trainer attends within samples, masked-row SDPA over the whole packed row (its block-diagonal
mask hides the other samples but does not skip them), padded batches over each row's padded length.

Framework overhead: the real `Trainer.step` on one pack (global-count all-reduce, loss, backward,
clip, AdamW, LR schedule, metrics to tensorboard) minus the forward and backward alone on the same
pack, alternated. Trials alternate packed / padded / padded_grouped; figures are medians.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
import torch.nn.functional as F

from benchmarks.packing import llava_like_mix

BATCH = 8


def synth_samples(adapter: Any, n: int, seed: int = 0) -> list[Any]:
    """Rendered samples of the LLaVA-like mix: an image block after a short prompt, the second half
    of the text labelled."""
    from trainer.data.render import IGNORE, Rendered

    image_id = adapter.tokenizer.convert_tokens_to_ids(adapter.image_token)
    special = set(adapter.tokenizer.all_special_ids) | {image_id}
    text_ids = torch.tensor([i for i in range(len(adapter.tokenizer)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, 336, 336, generator=g)
    samples = []
    for i, (length, image) in enumerate(llava_like_mix(n, seed)):
        ids = text_ids[torch.randint(len(text_ids), (length,), generator=g)]
        media = {}
        if image:
            ids[4 : 4 + 576] = image_id
            media = {"pixel_values": pixels.clone()}
        labels = torch.full((length,), IGNORE)
        answer = (length - (580 if image else 0)) // 2
        labels[length - answer :] = ids[length - answer :]
        samples.append(
            Rendered(
                input_ids=ids,
                labels=labels,
                position_ids=adapter.position_ids(ids, media),
                media=media,
                source=0,
                key=str(i),
                occurrence=i,
            )
        )
    return samples


def packed_batches(adapter: Any, samples: list, max_tokens: int, seed: int = 0) -> list[Any]:
    from trainer.data.packing import Packer, collate

    order = list(samples)
    random.Random(seed).shuffle(order)
    reserve = len(adapter.dummy_image[0])
    packer, packs = Packer(max_tokens, 128, reserve=reserve), []
    for s in order:
        packs.extend(collate(adapter, group) for group in packer.add(s))
    packs.extend(collate(adapter, group) for group in packer.flush())
    return packs


def padded_batches(adapter: Any, samples: list, grouped: bool, seed: int = 0) -> list[dict[str, Any]]:
    from trainer.data.render import IGNORE

    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    if grouped:
        window = BATCH * 64
        order = [
            i
            for w in range(0, len(order), window)
            for i in sorted(order[w : w + window], key=lambda i: -samples[i].length)
        ]
    batches = []
    for b in range(0, len(order), BATCH):
        rows = [samples[i] for i in order[b : b + BATCH]]
        longest = max(s.length for s in rows)
        ids = torch.full((len(rows), longest), adapter.pad_id)
        labels = torch.full((len(rows), longest), IGNORE)
        mask = torch.zeros((len(rows), longest), dtype=torch.int64)
        for r, s in enumerate(rows):
            ids[r, : s.length], labels[r, : s.length], mask[r, : s.length] = s.input_ids, s.labels, 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        pixels = [s.media["pixel_values"] for s in rows if s.media]
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels)
        batches.append(
            {
                "inputs": inputs,
                "labels": labels,
                "tokens": int(mask.sum()),
                "pairs": len(rows) * longest * (longest + 1) // 2,
            }
        )
    return batches


def padded_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    from trainer.data.render import IGNORE

    logits = model(**batch["inputs"], use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE,
        reduction="sum",
    )


def load_model(adapter: Any, attention: str) -> tuple[Any, Any]:
    """The checkpoint in fp32, vision tower frozen (finetune.* defaults), with its AdamW."""
    model = adapter.load_model(dtype=torch.float32, attn_implementation=attention)
    model.train()
    for name, param in model.named_parameters():
        param.requires_grad_(adapter.param_group(name) != "vision")
    return model, torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)


def run_steps(model: Any, optimizer: Any, steps: list[tuple[Any, int]]) -> float:
    """Seconds for one optimizer step per (loss function, target count)."""
    start = time.perf_counter()
    for loss_fn, targets in steps:
        (loss_fn() / max(targets, 1)).backward()
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.grad is not None], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def framework_overhead(model_dir: Path, root: Path, pack: Any, repeats: int) -> dict[str, float]:
    """Median Trainer.step time and forward+backward time on the same pack (milliseconds)."""
    from data_tools.samples import build_overfit_shards
    from trainer.config import load_config
    from trainer.loop import Trainer, micro_batch_loss
    from trainer.metrics import Metrics

    shards = build_overfit_shards(root / "overfit")  # the Trainer needs a shard set to exist
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.shards={shards}",
            "data.workers=0",
            f"run.dir={root / 'run'}",
            "train.activation_checkpointing=none",
            "train.steps=1000",
            "optim.lr=1e-4",
            "checkpoint.every=0",
        ],
    )
    trainer = Trainer(cfg, rank=0, world=1)
    trainer.metrics = Metrics(root / "run" / "tb", enabled=True)
    steps, fwd_bwd = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        trainer.step([pack], wait=0.0)
        t_step = time.perf_counter() - start
        start = time.perf_counter()
        loss = micro_batch_loss(trainer.model, trainer.adapter, pack, trainer.device)
        (loss / max(pack.targets, 1)).backward()
        t_fb = time.perf_counter() - start
        trainer.optimizer.zero_grad(set_to_none=True)
        if i:  # the first of each is a warm-up
            steps.append(t_step)
            fwd_bwd.append(t_fb)
    trainer.metrics.close()
    step, fb = statistics.median(steps) * 1e3, statistics.median(fwd_bwd) * 1e3
    return {
        "step_ms": round(step, 1),
        "fwd_bwd_ms": round(fb, 1),
        "framework_overhead_ms_per_step": round(step - fb, 1),
        "framework_overhead_fraction": round((step - fb) / step, 4),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--overhead-repeats", type=int, default=10)
    p.add_argument(
        "--overhead-tokens", type=int, default=2048, help="pack budget for the overhead measurement"
    )
    args = p.parse_args()
    torch.manual_seed(0)
    from trainer.data.render import IGNORE
    from trainer.loop import micro_batch_loss
    from trainer.models.registry import get_adapter
    from trainer.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_tiny("llava", root / "tiny-llava")
        adapter = get_adapter(model_dir)
        model, optimizer = load_model(adapter, adapter.attn_implementation())
        masked_model, masked_optimizer = load_model(adapter, "sdpa")
        samples = synth_samples(adapter, args.samples)
        useful = sum(s.length for s in samples)
        packs = packed_batches(adapter, samples, args.max_tokens)
        assert sum(pk.tokens for pk in packs) == useful
        cpu = torch.device("cpu")
        with torch.no_grad():
            same = [float(micro_batch_loss(m, adapter, packs[0], cpu)) for m in (model, masked_model)]
        assert abs(same[0] - same[1]) <= 1e-4 * abs(same[0]), same
        plans = {
            "packed": (
                model,
                optimizer,
                [(lambda pk=pk: micro_batch_loss(model, adapter, pk, cpu), pk.targets) for pk in packs],
            ),
            "packed_masked_row": (
                masked_model,
                masked_optimizer,
                [
                    (lambda pk=pk: micro_batch_loss(masked_model, adapter, pk, cpu), pk.targets)
                    for pk in packs
                ],
            ),
        }
        padded = {
            "padded": padded_batches(adapter, samples, grouped=False),
            "padded_grouped": padded_batches(adapter, samples, grouped=True),
        }
        for name, batches in padded.items():
            assert sum(b["tokens"] for b in batches) == useful
            plans[name] = (
                model,
                optimizer,
                [
                    (lambda b=b: padded_loss(model, b), int((b["labels"][:, 1:] != IGNORE).sum()))
                    for b in batches
                ],
            )
        for m, opt, steps in plans.values():  # warm-up
            run_steps(m, opt, steps[:1])
        times: dict[str, list[float]] = {name: [] for name in plans}
        for _ in range(args.trials):
            for name, (m, opt, steps) in plans.items():
                times[name].append(run_steps(m, opt, steps))
        small = packed_batches(adapter, samples, args.overhead_tokens)
        overhead = framework_overhead(
            model_dir, root, max(small, key=lambda pk: pk.tokens), args.overhead_repeats
        )

    result: dict[str, Any] = {
        "benchmark": "train",
        "samples": args.samples,
        "useful_tokens": useful,
        "max_tokens": args.max_tokens,
        "attention": adapter.attn_implementation(),
        "trials": args.trials,
        "threads": torch.get_num_threads(),
    }
    for name in plans:
        result[f"{name}_useful_tokens_per_s"] = round(useful / statistics.median(times[name]), 1)
        result[f"{name}_steps"] = len(plans[name][2])
    slots = {
        "packed": sum(pk.length for pk in packs),
        **{name: sum(b["inputs"]["input_ids"].numel() for b in batches) for name, batches in padded.items()},
    }
    pairs = {
        "packed": sum(s.length * (s.length + 1) // 2 for s in samples),
        "packed_masked_row": sum(pk.length * (pk.length + 1) // 2 for pk in packs),
        **{name: sum(b["pairs"] for b in batches) for name, batches in padded.items()},
    }
    for name in slots:
        result[f"{name}_token_efficiency"] = round(useful / slots[name], 4)
    for name in pairs:
        result[f"{name}_attention_pairs_per_token"] = round(pairs[name] / useful)
    # Per-trial ratios (padded time / packed time for the same tokens), then the median.
    for packed in ("packed", "packed_masked_row"):
        for name in padded:
            ratios = [b / a for a, b in zip(times[packed], times[name])]
            key = "useful_tokens_speedup_vs_padded" + ("" if name == "padded" else "_grouped")
            result[key + ("" if packed == "packed" else "_masked_row")] = round(statistics.median(ratios), 3)
    result.update(overhead, overhead_pack_tokens=args.overhead_tokens)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
