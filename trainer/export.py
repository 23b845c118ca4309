"""Export in Hugging Face format: `run.dir/hf/` loads with plain transformers (full finetuning)
or peft (LoRA: the adapter, plus with merge a full model in `hf/merged/`), with the processor.

    python -m trainer.export runs/my-run [--step N] [--merge]      # from a checkpoint, on one process
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from trainer.config import Config
from trainer.models.adapter import ModelAdapter

logger = logging.getLogger(__name__)


def export(model: nn.Module, adapter: ModelAdapter, cfg: Config, out: Path, merge: bool = False) -> Path | None:
    """Gather the full weights (collective) and write them from rank 0."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        # Written aside and renamed: a killed export never leaves a plausible half in `out`.
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _write(state, adapter, cfg, tmp, merge)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        logger.info("exported to %s", out)
    if dist.is_initialized():
        dist.barrier()
    return out if rank == 0 else None


def _write(state: dict[str, torch.Tensor], adapter: ModelAdapter, cfg: Config, out: Path, merge: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base = adapter.load_model(dtype=torch.float32)
    if cfg.finetune.method == "full":
        missing, unexpected = base.load_state_dict(state, strict=False)
        _check(missing, unexpected, base)
        base.save_pretrained(out)
    else:
        from trainer.lora import apply_lora, lora_config

        peft_model = apply_lora(base, lora_config(adapter, base, cfg.finetune))
        trained = {k: v for k, v in state.items() if "lora_" in k or "modules_to_save." in k}
        missing, unexpected = peft_model.load_state_dict(trained, strict=False)
        if unexpected:
            raise RuntimeError(f"export: unexpected keys {unexpected[:5]}")
        peft_model.save_pretrained(out)
        if merge:
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(out / "merged")
            adapter.processor.save_pretrained(out / "merged")
    adapter.processor.save_pretrained(out)
    logger.info("exported %s", cfg.finetune.method)


def _check(missing: list[str], unexpected: list[str], model: nn.Module) -> None:
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"export: the trained weights do not match the model: missing "
                           f"{sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--merge", action="store_true", help="with LoRA: also write a merged full model")
    p.add_argument("--out", type=Path, help="default: RUN_DIR/hf")
    args = p.parse_args(argv)
    from trainer import checkpoint
    from trainer.config import load_config
    from trainer.model import build_model
    from trainer.models.adapter import adapter_for
    from trainer.optim import build_optimizer

    cfg = load_config(args.run_dir / "config.yaml")
    path = args.run_dir / "checkpoints" / f"step-{args.step}" if args.step else checkpoint.latest(args.run_dir)
    if path is None or not path.is_dir():
        print(f"error: no checkpoint {'step-' + str(args.step) if args.step else ''} in {args.run_dir}/checkpoints",
              file=sys.stderr)
        return 2
    adapter = adapter_for(cfg.model)
    built = build_model(adapter, cfg, rank=0, world=1)
    optimizer = build_optimizer(built.model, adapter, cfg.optim, fused=False)
    checkpoint.load(path, built.model, optimizer)
    export(built.model, adapter, cfg, args.out or args.run_dir / "hf", merge=args.merge)
    print(args.out or args.run_dir / "hf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
