"""The training entry point (torchrun).

    torchrun --nproc-per-node 8 -m trainer.train --config configs/X.yaml [key=value ...]
    python -m trainer.train --config configs/tiny-llava.yaml --dry-run
    torchrun --nproc-per-node 2 -m trainer.train --config configs/tiny-llava.yaml --dry-run data.workers=2
    python -m trainer.train --help-config          # every config key with its default and doc

Relaunching the same command resumes from the newest complete checkpoint in run.dir.

--dry-run streams one full epoch through mixing, rendering and packing without building the
model, and prints as its last line one JSON object with totals over all ranks: samples, samples
per source, packs, tokens, packing efficiency, skips by reason, and "mix": how far the source mix
of each 1 % of the epoch (in training order) is from the epoch's target mix, median and worst,
next to what an i.i.d. order gives. Run it on CPU before a cluster job: it finds bad samples,
templates that do not fit, and wrong token budgets. `--order-out FILE` writes the epoch's training
order, one JSON line per sample: {"epoch", "step", "micro_batch", "rank", "source", "id"}; without
--dry-run it writes what each step of the training run trains.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from trainer.config import Config, config_help, load_config

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="stream one epoch of data without a model")
    p.add_argument("--epoch", type=int, default=0, help="with --dry-run: which epoch to plan")
    p.add_argument(
        "--order-out",
        type=Path,
        metavar="FILE",
        help="write the training order to FILE, one JSON line per sample (trainer/order.py): an "
        "epoch's with --dry-run, else what each step trains",
    )
    p.add_argument(
        "--help-config", action="store_true", help="print every config key with its default and doc, and exit"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.workers=4")
    args = p.parse_args(argv)
    if args.help_config:
        print(config_help())
        p.exit(0)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    return args, cfg


def dry_run(cfg: Config, epoch: int, order_out: Path | None = None) -> dict:
    """Stream one epoch on this rank; return the totals over all ranks (rank 0 writes `order_out`)."""
    from data_tools.mixing import mix_report, target_mix
    from trainer.data.pipeline import EpochBatches, build_loader
    from trainer.dist import gather_objects, init_distributed
    from trainer.models.registry import adapter_for
    from trainer.order import order_line, training_order

    rank, world = init_distributed(cfg.train.dist_timeout_s)
    adapter = adapter_for(cfg.model)
    loader = build_loader(cfg.data, adapter, seed=cfg.train.seed, rank=rank, world=world)
    loader.dataset.set_epoch(epoch)
    batches = EpochBatches(loader, adapter, cfg.data.max_skip_fraction)
    packs = tokens = samples = trimmed = 0
    order = []  # (micro-batch, source, id) of each sample, in this rank's order
    for micro_batch, pack in enumerate(batches):
        order += [(micro_batch, source, id_) for source, id_ in zip(pack.sources, pack.ids)]
        if pack.empty:
            continue
        packs += 1
        tokens += pack.tokens
        samples += len(pack.sources)
        trimmed += pack.trimmed
    mine = {
        "samples": samples,
        "packs": packs,
        "tokens": tokens,
        "trimmed": trimmed,
        "steps": batches.steps,
        "per_source": dict(batches.per_source),
        "skips": dict(batches.skips),
        "order": order if order_out else [(m, s) for m, s, _ in order],
    }
    everyone = gather_objects(mine)
    manifest = loader.dataset.manifest
    trained = training_order([r["order"] for r in everyone])
    epoch_samples = [s.epoch_samples for s in manifest.sources]
    mix = mix_report([row[2] for row in trained], target_mix(epoch_samples), window=sum(epoch_samples) // 100)
    if order_out and rank == 0:
        with open(order_out, "w", encoding="utf-8") as f:
            for micro_batch, r, source, sample_id in trained:
                f.write(
                    order_line(
                        epoch, cfg.train.grad_accum, micro_batch, r, manifest.sources[source].path, sample_id
                    )
                )
    per_source: Counter[str] = Counter({s.path: 0 for s in manifest.sources})
    skipped: Counter[str] = Counter()
    skipped_per_source: Counter[str] = Counter()
    for r in everyone:
        for src, n in r["per_source"].items():
            per_source[manifest.sources[src].path] += n
        for key, n in r["skips"].items():
            reason, _, src = key.rpartition(":")
            skipped[reason] += n
            skipped_per_source[manifest.sources[int(src)].path] += n
    total = {k: sum(r[k] for r in everyone) for k in ("samples", "packs", "tokens", "trimmed")}
    slots = total["packs"] * cfg.data.packing.max_tokens
    return {
        **total,
        "per_source": dict(per_source),
        "skipped": dict(sorted(skipped.items())),
        "skipped_per_source": dict(skipped_per_source),
        "packing_efficiency": round(total["tokens"] / slots, 6) if slots else 0.0,
        "steps_per_rank": [r["steps"] for r in everyone],
        "ranks": world,
        "epoch": epoch,
        "max_tokens": cfg.data.packing.max_tokens,
        "mix": mix,
    }


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    from trainer.dist import init_distributed, setup_logging, shutdown

    rank, _ = init_distributed(cfg.train.dist_timeout_s)
    setup_logging(rank)
    ok = False
    try:
        from trainer.compose import ensure_composed

        ensure_composed(cfg.model, rank)
        if not args.dry_run:
            from trainer.loop import train

            result = train(cfg, args.order_out)
            if rank == 0:
                print(
                    json.dumps({k: v for k, v in result.items() if k != "losses"}, sort_keys=True), flush=True
                )
        else:
            result = dry_run(cfg, args.epoch, args.order_out)
            if rank == 0:
                print(json.dumps(result, sort_keys=True), flush=True)
        ok = True
        return 0
    finally:
        shutdown(ok)


if __name__ == "__main__":
    code = main()
    # Leave without running C++ static destructors: gloo's worker threads can still be unwinding
    # at interpreter teardown and abort the process (SIGABRT after a successful run, about one run
    # in three on CPU here), which torchrun would report as a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
