"""MFU of mmloom's training step for a ~2B-parameter LMM on GPUs: prints one JSON line.

    python benchmarks/gpu/mfu.py                                  # one GPU
    torchrun --nproc-per-node 8 benchmarks/gpu/mfu.py             # FSDP2 over 8 GPUs
    python benchmarks/gpu/mfu.py --ac none full --compile off     # a subset of the grid
    python benchmarks/gpu/mfu.py --smoke                          # CPU: a tiny model through the same code

Without a GPU it prints {"benchmark": "gpu_mfu", "skipped": ...} and exits 0.

The model is Qwen2-VL-2B-Instruct's architecture (the published config: a 28-layer 1536-wide
Qwen2 language model with 151,936-token vocabulary, a 32-layer 1280-wide ViT with 14-px patches
and 2x2 merge; 2.2B parameters) with random weights, built by `from_config` directly on the
GPU in fp32 (the master weights) and wrapped by trainer/parallel.py exactly as the trainer wraps
a real checkpoint: activation checkpointing (`--ac`), per-block torch.compile (`--compile`),
FSDP2 with bf16 compute and fp32 reduction (always, also on one GPU). The step is the trainer's
own `Trainer.step` (global target count, loss, backward, clip, fused AdamW, LR schedule), fed
by the real data pipeline: the LLaVA-like mix of benchmarks/corpus.py with real photographs,
converted by data_tools/shard.py and rendered by the Qwen2-VL processor geometry (a tiny
tokenizer, the real image processor), packed into 8192-token sequences. finetune.* defaults
apply: the vision tower is frozen, projector and language model are trained.

Model FLOPs per step are counted from the packed samples themselves (the grey image a text-only
pack carries and the activation recomputation are not counted):
- language model: 2 x matmul parameters per token forward, x3 with backward; lm_head the same,
  for the positions that predict a target (the only ones the trainer projects); causal
  attention 4 x (L(L+1)/2) x heads x head_dim per layer for each sample of length L (not for the
  packed row: samples do not attend to each other);
- projector (merger, trained): 2 x parameters per merged token, x3;
- vision tower (frozen, forward only): 2 x matmul parameters (patch embedding included) per
  patch, and 4 x n^2 x width per layer for each frame of n patches (full attention).
MFU = model FLOPs / (wall time x GPUs x peak dense bf16 FLOP/s of the device, from a table of
datasheet figures keyed by the device name, or `--peak-tflops`). Wall time is data wait + step;
data-wait fraction = time blocked on the next micro-batch / wall time. Peak memory is
torch.cuda.max_memory_allocated on rank 0. `matmul_tflops`: a bf16 8192^3 matmul on this device,
the practical ceiling.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch
import torch.distributed as dist

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s), first match on the name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.4), ("H100", 989.4), ("H800", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1))

# Qwen/Qwen2-VL-2B-Instruct config.json: the architecture sizes (token ids stay the tiny tokenizer's).
QWEN2_VL_2B_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, vocab_size=151936, max_window_layers=28, initializer_range=0.02)
QWEN2_VL_2B_VISION = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)


# --- the model ---------------------------------------------------------------------------------


def write_checkpoint(out: Path, smoke: bool) -> Path:
    """A checkpoint directory without weights: the tiny Qwen2-VL's processor and a config with the
    2B architecture (the tiny one itself for --smoke)."""
    from trainer.models.tiny import build_tiny

    tiny = build_tiny("qwen2_vl", out.parent / "tiny-qwen2-vl")
    out.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    if not smoke:
        config = json.loads((tiny / "config.json").read_text())
        config["text_config"].update(QWEN2_VL_2B_TEXT)
        config["text_config"].pop("layer_types", None)          # recomputed for 28 layers
        config["text_config"]["rope_parameters"]["mrope_section"] = [16, 24, 24]
        config["vision_config"].update(QWEN2_VL_2B_VISION)
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def random_model_builder(attention: str | None):
    """A stand-in for trainer.model.build_model: the same wrapping, random weights instead of a load."""
    from torch.distributed.device_mesh import init_device_mesh

    from trainer.model import Built, _sum_gradients, freeze
    from trainer.parallel import apply_activation_checkpointing, apply_compile, apply_fsdp

    def build(adapter: Any, cfg: Any, rank: int, world: int) -> Any:
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        dtype = torch.bfloat16 if cuda else torch.float32
        torch.manual_seed(cfg.train.seed)
        with device:
            model = adapter.model_from_config(dtype=torch.float32,
                                              attn_implementation=attention or adapter.attn_implementation())
        freeze(model, adapter, cfg)
        model.train()
        model.config.use_cache = False
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
        if cfg.train.compile and cuda:
            apply_compile(model)
        mesh = init_device_mesh(device.type, (world,))
        apply_fsdp(model, mesh, param_dtype=dtype)
        _sum_gradients(model)
        return Built(model=model, mesh=mesh, device=device, compute_dtype=dtype)

    return build


def matmul_params(model: torch.nn.Module, adapter: Any) -> dict[str, int]:
    """Parameters that multiply activations, by group: vision blocks and patch embedding,
    projector, language model (the embedding lookup excluded), and lm_head (which may be the
    embedding matrix itself: the 2B model ties them)."""
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    counts = {"vision": 0, "projector": 0, "llm": 0, "lm_head": head.numel()}
    for name, p in model.named_parameters():
        if p.ndim < 2 or p is embedding or p is head:
            continue
        plain = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        counts[adapter.param_group(plain)] += p.numel()
    return counts


def forward_flops(pack: Any, params: dict[str, int], config: Any) -> dict[str, int]:
    """Forward FLOPs of one packed micro-batch by part, from its samples' own lengths and images."""
    text, vision = config.text_config, config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    tokens = sum(pack.lengths)
    pairs = sum(n * (n + 1) // 2 for n in pack.lengths)             # causal, within each sample
    parts = {"llm_linear": 2 * params["llm"] * tokens,
             "lm_head": 2 * params["lm_head"] * pack.targets,            # the trainer projects targets only
             "llm_attention": 4 * pairs * text.num_attention_heads * head_dim * text.num_hidden_layers,
             "vision_linear": 0, "vision_attention": 0, "projector": 0}
    grids = pack.inputs.get("image_grid_thw")
    if grids is not None:
        grids = grids[:-1] if pack.dummy else grids                   # the grey image is not the model's work
        patches = int(grids.prod(dim=1).sum())
        frame_pairs = int(sum(t * (h * w) ** 2 for t, h, w in grids.tolist()))   # full attention per frame
        parts["vision_linear"] = 2 * params["vision"] * patches
        parts["vision_attention"] = 4 * frame_pairs * vision.embed_dim * vision.depth
        parts["projector"] = 2 * params["projector"] * patches // vision.spatial_merge_size ** 2
    return parts


def pack_flops(pack: Any, params: dict[str, int], config: Any, train_vision: bool) -> float:
    """Model FLOPs of one training step on the pack: forward x3 for what is trained (backward is
    twice the forward), x1 for a frozen vision tower (no backward runs through it)."""
    f = forward_flops(pack, params, config)
    vision = f["vision_linear"] + f["vision_attention"]
    trained = f["llm_linear"] + f["lm_head"] + f["llm_attention"] + f["projector"]
    return float(3 * trained + (3 if train_vision else 1) * vision)


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * reps / (time.perf_counter() - start) / 1e12


# --- the data ------------------------------------------------------------------------------------


def build_shards(root: Path, samples: int) -> Path:
    from benchmarks.corpus import llava_like_records
    from benchmarks.shard import make_images
    from data_tools.shard import main as shard_main

    media = root / "media"
    media.mkdir(parents=True)
    records = llava_like_records(samples, make_images(media, min(samples, 500)))
    (media / "mix.json").write_text(json.dumps(records))
    (root / "data.txt").write_text(f"{media / 'mix.json'} {samples / 1000}\n")
    assert shard_main([str(root / "data.txt"), "--out", str(root / "shards"), "--workers", "4", "-q"]) == 0
    return root / "shards"


# --- one configuration ---------------------------------------------------------------------------


def run_config(args: argparse.Namespace, ckpt: Path, shards: Path, run_dir: Path, ac: str, compile_: bool,
               rank: int, world: int) -> dict[str, Any]:
    from trainer import loop
    from trainer.config import load_config
    from trainer.data.pipeline import EpochBatches
    from trainer.metrics import Metrics

    cfg = load_config(None, [f"model.path={ckpt}", f"data.shards={shards}", f"run.dir={run_dir}",
                             f"data.workers={args.workers}", f"data.packing.max_tokens={args.max_tokens}",
                             f"train.activation_checkpointing={ac}", f"train.compile={str(compile_).lower()}",
                             "train.steps=1000000", "checkpoint.every=0", "run.export=false", "optim.lr=1e-5",
                             f"finetune.freeze_vision={str(not args.train_vision).lower()}"])
    loop.build_model = random_model_builder(args.attn)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row: dict[str, Any] = {"ac": ac, "compile": compile_}
    trainer = None
    try:
        start = time.perf_counter()
        trainer = loop.Trainer(cfg, rank, world)
        trainer.metrics = Metrics(run_dir / "tb", enabled=False)
        row["build_s"] = round(time.perf_counter() - start, 1)
        params = matmul_params(trainer.model, trainer.adapter)
        row["attention"] = trainer.model.config._attn_implementation
        trainer.loader.dataset.set_epoch(0)
        trainer.batches = EpochBatches(trainer.loader, trainer.adapter, cfg.data.max_skip_fraction)
        it = iter(trainer.batches)
        waits, steps, flops, tokens = [], [], [], []
        warm = time.perf_counter()
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                row["warmup_s"] = round(time.perf_counter() - warm, 1)
            t0 = time.perf_counter()
            pack = next(it)
            t1 = time.perf_counter()
            trainer.step([pack], t1 - t0)            # ends in .item()/.tolist(): the GPU is done
            t2 = time.perf_counter()
            if i >= args.warmup:
                waits.append(t1 - t0)
                steps.append(t2 - t1)
                flops.append(pack_flops(pack, params, trainer.adapter.config, args.train_vision))
                tokens.append(sum(pack.lengths))
        totals = torch.tensor([sum(flops), sum(tokens)], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(totals)
        wall = sum(waits) + sum(steps)
        peak = peak_tflops(args.peak_tflops) if cuda else args.peak_tflops
        row.update(
            steps=args.steps, step_s=round(statistics.median(steps), 4),
            tokens_per_s=round(float(totals[1]) / wall, 1),
            model_tflops_per_s_per_gpu=round(float(totals[0]) / wall / world / 1e12, 2),
            mfu=round(float(totals[0]) / wall / world / (peak * 1e12), 4) if peak else None,
            data_wait_fraction=round(sum(waits) / wall, 4),
            peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None)
    except torch.OutOfMemoryError as e:
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
    finally:
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def init_process_group() -> tuple[int, int]:
    """torchrun's group, or a one-process group (FSDP2 needs one even on a single GPU)."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ac", nargs="+", default=["none", "selective", "full"], choices=["none", "selective", "full"])
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--attn", default=None, help="attention implementation (default: the adapter's choice)")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--samples", type=int, default=3000, help="samples in the benchmark's shard set")
    p.add_argument("--workers", type=int, default=None, help="data workers per rank (default: cores / ranks - 1)")
    p.add_argument("--train-vision", action="store_true", help="train the vision tower too (default: frozen)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    p.add_argument("--smoke", action="store_true", help="on CPU: the tiny Qwen2-VL, 2 steps per configuration")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not torch.cuda.is_available() and not args.smoke:
        print("benchmarks/gpu/mfu.py: no GPU here (torch.cuda.is_available() is False); nothing measured",
              file=sys.stderr)
        print(json.dumps({"benchmark": "gpu_mfu", "skipped": "no GPU"}))
        return 0
    if args.smoke:
        args.max_tokens, args.steps, args.warmup, args.samples = 2048, 2, 1, 60
        args.compile = ["off"]
    rank, world = init_process_group()
    if args.workers is None:
        args.workers = max(1, (os.cpu_count() or 2) // world - 1)
    from trainer.dist import setup_logging

    setup_logging(rank)
    # Rank 0 writes the data and the checkpoint directory; with several nodes, point TMPDIR at a
    # shared filesystem.
    paths = [tempfile.mkdtemp(prefix="mmloom-mfu-") if rank == 0 else None]
    dist.broadcast_object_list(paths, src=0)
    root = Path(paths[0])
    try:
        if rank == 0:
            write_checkpoint(root / "qwen2-vl-2b-random", args.smoke)
            build_shards(root / "data", args.samples)
        dist.barrier()
        ckpt, shards = root / "qwen2-vl-2b-random", root / "data" / "shards"
        result: dict[str, Any] = {"benchmark": "gpu_mfu", "smoke": args.smoke, "world": world,
                                  "max_tokens": args.max_tokens, "train_vision": args.train_vision}
        if torch.cuda.is_available():
            result.update(device=torch.cuda.get_device_name(), peak_bf16_tflops=peak_tflops(args.peak_tflops),
                          matmul_tflops=round(matmul_tflops(), 1), torch=torch.__version__)
        runs = []
        for compile_ in args.compile:
            for ac in args.ac:
                runs.append(run_config(args, ckpt, shards, root / f"run-{ac}-{compile_}", ac, compile_ == "on",
                                       rank, world))
                if rank == 0:
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)      # progress
        from trainer.models.adapter import get_adapter

        config = get_adapter(ckpt).config
        with torch.device("meta"):
            skeleton = get_adapter(ckpt).model_from_config()
        result["parameters"] = sum(q.numel() for q in skeleton.parameters())
        result["text_layers"], result["vision_depth"] = config.text_config.num_hidden_layers, config.vision_config.depth
        result["runs"] = runs
        if rank == 0:
            print(json.dumps(result), flush=True)
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
