"""Export in Hugging Face format: `run.dir/hf/` loads with plain transformers (full finetuning)
or peft (LoRA: the adapter, plus with merge a full model in `hf/merged/`), with the processor.

    python -m trainer.export runs/my-run [--step N] [--merge]      # from a checkpoint, on one process

Weights are written in the checkpoint's dtype, under the names `save_pretrained` gives them, in
safetensors files of at most `max_shard_gib`. A full finetune is streamed a file at a time: every
rank gathers one tensor after another (all ranks take part in each gather), rank 0 writes each file
as soon as it is complete, so no host ever holds more than one file of it; the ranks wait for one
file's write at most inside a collective. Where transformers converts weights on save (a mixture of
experts stored one tensor per expert: Qwen3.5-MoE, GLM-4.5V), each block's tensors are gathered
together and converted by transformers' own `revert_weight_conversion`, and files take whole blocks.
LoRA gathers only the trained tensors. Everything is written under `.hf.tmp` and renamed when
complete: a killed export never leaves a plausible half.
A LoRA merge needs the base weights: rank 0 loads the base in the checkpoint's dtype (one copy of
it in host memory) while the other ranks wait on the rendezvous store.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from trainer.config import Config
from trainer.dist import wait_for_rank0
from trainer.model import checkpoint_dtype, freeze
from trainer.models.building import Building

logger = logging.getLogger(__name__)

MAX_SHARD_GIB = 5.0


def trained_key(name: str) -> bool:
    """Whether a LoRA model's state-dict key is trained (an adapter, or peft's copy of the projector)."""
    return "lora_" in name or "modules_to_save." in name


def export(
    model: nn.Module,
    adapter: Building,
    cfg: Config,
    out: Path,
    merge: bool = False,
    max_shard_gib: float = MAX_SHARD_GIB,
) -> Path | None:
    """Write the model (collective: every rank calls it); returns `out` on rank 0."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = get_model_state_dict(model)  # this rank's shards under the plain model's keys: no gather
    with written(out, adapter, rank) as tmp:
        if cfg.finetune.method == "full":
            write_full(state, adapter, tmp, rank, max_shard_gib)
        else:
            dtype = checkpoint_dtype(adapter)
            trained = {k: gather(v, dtype, rank) for k, v in state.items() if trained_key(k)}
            if rank == 0:
                write_lora(trained, adapter, cfg, tmp, merge)
    wait_for_rank0("writing the export", cfg.train.dist_timeout_s)
    return out if rank == 0 else None


@contextlib.contextmanager
def written(out: Path, adapter: Building, rank: int) -> Iterator[Path]:
    """A temporary directory beside `out` to write into; on success (rank 0) the processor joins the
    weights and the directory becomes `out`."""
    tmp = out.with_name(f".{out.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    yield tmp
    if rank == 0:
        adapter.processor.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        logger.info("exported to %s", out)


def gather(tensor: torch.Tensor, dtype: torch.dtype, rank: int) -> torch.Tensor | None:
    """The full tensor in `dtype` on rank 0's host (None elsewhere); collective for a sharded one."""
    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    if full.is_floating_point():
        full = full.to(dtype)  # on the device: half the bytes to copy for bf16
    return full.detach().to("cpu") if rank == 0 else None


def skeleton(adapter: Building) -> nn.Module:
    """The architecture on the meta device, in the checkpoint's dtype: names, shapes and config."""
    with torch.device("meta"):
        model = adapter.model_from_config(dtype=checkpoint_dtype(adapter))
    model.config._name_or_path = str(adapter.path)
    return model


def saved_names(model: nn.Module) -> dict[str, str] | None:
    """{state-dict key: the name save_pretrained writes it under} (tied copies left out), or None when
    transformers' conversion to the checkpoint format is not a renaming (it would merge or split tensors)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    kept = remove_tied_weights_from_state_dict(model.state_dict(), model)
    reverted = revert_weight_conversion(model, dict(kept))
    by_id = {id(t): k for k, t in kept.items()}
    names = {by_id.get(id(t)): saved for saved, t in reverted.items()}
    return None if None in names or len(names) != len(kept) else names


def _group(key: str) -> str:
    """The unit a weight conversion may span: a transformer block (experts, fused projections), or
    the key alone outside the blocks."""
    match = re.match(r"(.*?\.(?:layers|blocks|layer)\.\d+)\.", key)
    return match.group(1) if match else key


def converted_files(model: nn.Module, max_shard_gib: float) -> tuple[list, bool, dict]:
    """The write plan of a model that transformers converts on save (a mixture of experts stored as one
    tensor per expert, fused projections split): each block's weights are gathered together and
    converted with transformers' own `revert_weight_conversion`, on rank 0, a block at a time; files
    take whole blocks up to `max_shard_gib`. ([(file, [(keys, saved names)])], sharded, metadata)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    kept = remove_tied_weights_from_state_dict(model.state_dict(), model)
    groups: dict[str, list[str]] = {}
    for key in kept:
        groups.setdefault(_group(key), []).append(key)
    whole = revert_weight_conversion(model, dict(kept))
    files: list[list] = [[]]
    size = total = 0
    seen: dict[str, tuple] = {}
    for keys in groups.values():
        saved = revert_weight_conversion(model, {k: kept[k] for k in keys})
        seen.update({name: tuple(t.shape) for name, t in saved.items()})
        nbytes = sum(t.numel() * t.element_size() for t in saved.values())
        if files[-1] and size + nbytes > max_shard_gib * 2**30:
            files.append([])
            size = 0
        files[-1].append((keys, sorted(saved)))
        size, total = size + nbytes, total + nbytes
    if seen != {name: tuple(t.shape) for name, t in whole.items()}:
        raise NotImplementedError(
            f"{type(model).__name__}: transformers' conversion on save spans more than one block; "
            f"the streamed export cannot write it"
        )
    count = len(files)
    names = [
        f"model-{i + 1:05d}-of-{count:05d}.safetensors" if count > 1 else "model.safetensors"
        for i in range(count)
    ]
    return list(zip(names, files)), count > 1, {"total_size": total}


def revert(model: nn.Module, full: dict[str, torch.Tensor], saved: list[str]) -> dict[str, torch.Tensor]:
    """One block's gathered weights, converted to the names and layout save_pretrained writes."""
    from transformers.core_model_loading import revert_weight_conversion

    out = revert_weight_conversion(model, full)
    assert sorted(out) == saved, (sorted(out)[:3], saved[:3])
    return {name: t.clone() for name, t in out.items()}  # split views would share storage


def write_full(
    state: dict[str, torch.Tensor], adapter: Building, out: Path, rank: int, max_shard_gib: float
) -> None:
    """Stream a full finetune into safetensors files (collective)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    plan: list = [None]
    model = skeleton(adapter) if rank == 0 else None
    if model is not None:
        names = saved_names(model)
        if names is not None:
            meta = model.state_dict()
            split = split_torch_state_dict_into_shards(
                {saved: meta[key] for key, saved in names.items()},
                filename_pattern="model{suffix}.safetensors",
                max_shard_size=int(max_shard_gib * 2**30),
            )
            by_saved = {saved: key for key, saved in names.items()}
            files = [
                (file, [([by_saved[s]], [s]) for s in saved])
                for file, saved in split.filename_to_tensors.items()
            ]
            plan = [(files, split.is_sharded, split.metadata, False)]
        else:
            plan = [(*converted_files(model, max_shard_gib), True)]
        model.config.save_pretrained(out)
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(out)
        if getattr(model, "_auto_class", None) is not None:  # remote code travels with the weights
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(model, out, config=model.config)
    if dist.is_initialized():
        dist.broadcast_object_list(plan, src=0)
    files, sharded, metadata, converted = plan[0]
    dtype = checkpoint_dtype(adapter)
    for file, groups in files:
        tensors: dict[str, torch.Tensor] = {}
        for keys, saved in groups:
            full = {key: gather(state[key], dtype, rank) for key in keys}
            if rank == 0:
                tensors.update(revert(model, full, saved) if converted else {saved[0]: full[keys[0]]})
        if rank == 0:
            save_file({k: t.contiguous() for k, t in tensors.items()}, out / file, metadata={"format": "pt"})
        del tensors
    if rank == 0 and sharded:
        weight_map = {saved: file for file, groups in files for _, written in groups for saved in written}
        index = {"metadata": metadata, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_lora(
    trained: dict[str, torch.Tensor], adapter: Building, cfg: Config, out: Path, merge: bool
) -> None:
    """The adapter (and peft's copy of a trained projector) through peft's own writer; with `merge`,
    also the base with the adapters merged in, in out/merged."""
    from trainer.lora import apply_lora, lora_config

    model = skeleton(adapter)
    peft_model = apply_lora(model, lora_config(adapter, model, cfg.finetune))
    missing = {k for k, p in peft_model.state_dict().items() if trained_key(k)} - trained.keys()
    if missing:
        raise RuntimeError(f"export: the trained weights lack {sorted(missing)[:5]}")
    peft_model.save_pretrained(out, state_dict=trained)
    if merge:
        base = adapter.load_model(dtype=checkpoint_dtype(adapter))
        merged = apply_lora(base, lora_config(adapter, base, cfg.finetune))
        merged.load_state_dict(trained, strict=False)
        merged = merged.merge_and_unload()
        merged.save_pretrained(out / "merged")
        adapter.processor.save_pretrained(out / "merged")


def load_trained(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of a checkpoint, read on one process into plain CPU tensors (fp32, as
    trained) without the optimizer state or the frozen weights: `model` (on the meta device) gives
    their names and shapes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    trained = {
        n: torch.empty(p.shape, dtype=torch.float32) for n, p in model.named_parameters() if p.requires_grad
    }
    state = {"model": trained}
    dcp.load(
        state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True
    )
    return state["model"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--merge", action="store_true", help="with LoRA: also write a merged full model")
    p.add_argument("--out", type=Path, help="default: RUN_DIR/hf")
    args = p.parse_args(argv)
    from trainer import checkpoint
    from trainer.config import load_config
    from trainer.models.registry import adapter_for

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.run_dir / "config.yaml")
    path = (
        args.run_dir / "checkpoints" / f"step-{args.step}" if args.step else checkpoint.latest(args.run_dir)
    )
    if path is None or not path.is_dir():
        print(
            f"error: no checkpoint {'step-' + str(args.step) if args.step else ''} "
            f"in {args.run_dir}/checkpoints",
            file=sys.stderr,
        )
        return 2
    adapter = adapter_for(cfg.model)
    # The training model's names on the meta device (a QLoRA model's names are its unquantized twin's).
    model = skeleton(adapter)
    if cfg.finetune.method != "full":
        from trainer.lora import apply_lora, lora_config

        model = apply_lora(model, lora_config(adapter, model, cfg.finetune))
    freeze(model, adapter, cfg)
    trained = load_trained(path, model)
    out = args.out or args.run_dir / "hf"
    if cfg.finetune.method == "full":
        # The frozen weights come from the base checkpoint: loaded on the host, in its dtype.
        model = adapter.load_model(dtype=checkpoint_dtype(adapter))
        _, unexpected = model.load_state_dict(trained, strict=False)
        if unexpected:
            raise RuntimeError(f"export: {path} holds weights the model lacks: {unexpected[:5]}")
        export(model, adapter, cfg, out, max_shard_gib=cfg.run.export_shard_gib)
    else:  # the adapter needs nothing else
        with written(out, adapter, rank=0) as tmp:
            dtype = checkpoint_dtype(adapter)
            write_lora({k: v.to(dtype) for k, v in trained.items()}, adapter, cfg, tmp, args.merge)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
