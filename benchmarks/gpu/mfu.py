"""MFU of mmloom's training step for a ~2B-parameter LMM on GPUs: prints one JSON line.

    python benchmarks/gpu/mfu.py                                  # one GPU
    torchrun --nproc-per-node 8 benchmarks/gpu/mfu.py             # FSDP2 over 8 GPUs
    python benchmarks/gpu/mfu.py --ac none full --compile off     # a subset of the grid
    python benchmarks/gpu/mfu.py --smoke                          # CPU: a tiny model through the same code

Without a GPU it prints {"benchmark": "gpu_mfu", "skipped": ...} and exits 0.

The model is Qwen2-VL-2B-Instruct's architecture (the published config: a 28-layer 1536-wide
Qwen2 language model with 151,936-token vocabulary, a 32-layer 1280-wide ViT with 14-px patches
and 2x2 merge; 2.2B parameters) with random weights, written once as a bf16 checkpoint
(`write_checkpoint`) and built by the trainer's own `trainer.model.build_model`, as a real run
builds it: loaded in the checkpoint's dtype, trained parameters as fp32 masters, activation
checkpointing (`--ac`), torch.compile (`--compile`), FSDP2 with bf16 compute and fp32 reduction on
several GPUs (one GPU: no sharding, bf16 autocast, as the trainer runs there). The step is the
trainer's own `Trainer.step` (global target count, loss, backward, clip, fused AdamW, LR schedule),
fed by the real data pipeline: the LLaVA-like mix of benchmarks/corpus.py with real photographs,
converted by data_tools/shard.py and rendered by the Qwen2-VL processor geometry (a tiny tokenizer,
the real image processor), packed into 8192-token sequences. finetune.* defaults apply: the vision
tower is frozen, projector and language model are trained.

Model FLOPs per step are counted from the packed samples themselves by trainer/flops.py, the count
the trainer logs as perf/mfu (its docstring: per-sample causal attention, lm_head on the targets
only, the frozen tower forward only; the grey image of a text-only pack and activation
recomputation not counted). MFU = model FLOPs / (wall time x GPUs x peak dense bf16 FLOP/s of the
device, from trainer/flops.py's table of datasheet figures keyed by the device name, or
`--peak-tflops`). Wall time is data wait + step; data-wait fraction = time blocked on the next
micro-batch / wall time. Peak memory is torch.cuda.max_memory_allocated on rank 0.
`matmul_tflops`: a bf16 8192^3 matmul on this device, the practical ceiling. With compile on,
`compile_counts` gives Dynamo's graphs, graph breaks and recompiles (the first reasons) over the
configuration's build and steps. `--attn` sets the language model's attention backend.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch
import torch.distributed as dist

from trainer.flops import ModelFlops, peak_tflops

# Qwen/Qwen2-VL-2B-Instruct config.json: the architecture sizes (token ids stay the tiny tokenizer's).
QWEN2_VL_2B_TEXT = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    max_window_layers=28,
    initializer_range=0.02,
)
QWEN2_VL_2B_VISION = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)


# --- the model ---------------------------------------------------------------------------------


def random_checkpoint(family: str, out: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """A bf16 checkpoint directory of `family` with random weights: the tiny model's processor and its
    config.json as `edit` changes it (without `edit`: the tiny model itself). New weights are drawn on
    the GPU when there is one. Loaded later by the trainer like any checkpoint."""
    from trainer.models.registry import get_adapter
    from trainer.tiny import build_tiny

    tiny = build_tiny(family, out.parent / f"tiny-{family}-bf16", dtype="bfloat16")
    out.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        if edit is None or f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    if edit is None:
        return out
    config = json.loads((tiny / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    with torch.random.fork_rng(devices=[]), torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.manual_seed(0)
        model = get_adapter(out).model_from_config(dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def qwen2_vl_2b(config: dict) -> None:
    """The tiny Qwen2-VL's config.json -> Qwen2-VL-2B's architecture."""
    config["text_config"].update(QWEN2_VL_2B_TEXT)
    config["text_config"].pop("layer_types", None)  # recomputed for 28 layers
    config["text_config"]["rope_parameters"]["mrope_section"] = [16, 24, 24]
    config["vision_config"].update(QWEN2_VL_2B_VISION)


def write_checkpoint(out: Path, smoke: bool) -> Path:
    """The benchmark's model: Qwen2-VL-2B's architecture with random bf16 weights (--smoke: the tiny one)."""
    return random_checkpoint("qwen2_vl", out, None if smoke else qwen2_vl_2b)


class CompileCounts:
    """Dynamo's graphs, graph breaks and recompiles since `reset()` (recompiles from its own log)."""

    def __init__(self) -> None:
        import logging

        import torch._logging

        class Counter(logging.Handler):
            def __init__(self) -> None:
                super().__init__()
                self.n, self.reasons = 0, []

            def emit(self, record: logging.LogRecord) -> None:
                self.n += 1
                if len(self.reasons) < 3:  # the first few, to say why
                    self.reasons.append(record.getMessage()[-300:])

        self.recompiles = Counter()
        torch._logging.set_logs(recompiles=True)
        log = logging.getLogger("torch._dynamo.guards.__recompiles")
        log.addHandler(self.recompiles)
        log.propagate = False  # counted, not printed

    def reset(self) -> None:
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        self.recompiles.n, self.recompiles.reasons = 0, []

    def read(self) -> dict[str, Any]:
        from torch._dynamo.utils import counters

        return {
            "graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompiles": self.recompiles.n,
            "recompile_reasons": list(self.recompiles.reasons),
        }


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
    return 2 * 8192**3 * reps / (time.perf_counter() - start) / 1e12


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


def run_config(
    args: argparse.Namespace,
    ckpt: Path,
    shards: Path,
    run_dir: Path,
    ac: str,
    compile_: bool,
    rank: int,
    world: int,
    counts: CompileCounts,
) -> dict[str, Any]:
    from trainer import loop
    from trainer.config import load_config
    from trainer.data.pipeline import EpochBatches
    from trainer.metrics import Metrics

    cfg = load_config(
        None,
        [
            f"model.path={ckpt}",
            f"data.shards={shards}",
            f"run.dir={run_dir}",
            f"data.workers={args.workers}",
            f"data.packing.max_tokens={args.max_tokens}",
            f"train.activation_checkpointing={ac}",
            f"train.compile={str(compile_).lower()}",
            "train.steps=1000000",
            "checkpoint.every=0",
            "run.export=false",
            "optim.lr=1e-5",
            f"finetune.freeze_vision={str(not args.train_vision).lower()}",
        ],
    )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    counts.reset()
    row: dict[str, Any] = {"ac": ac, "compile": compile_}
    trainer = None
    try:
        start = time.perf_counter()
        trainer = loop.Trainer(cfg, rank, world)
        trainer.metrics = Metrics(run_dir / "tb", enabled=False)
        row["build_s"] = round(time.perf_counter() - start, 1)
        counter = ModelFlops.of(trainer.model, trainer.adapter)
        row["attention"] = trainer.model.config.get_text_config()._attn_implementation
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
            trainer.step([pack], t1 - t0)  # ends in .item()/.tolist(): the GPU is done
            t2 = time.perf_counter()
            if i >= args.warmup:
                waits.append(t1 - t0)
                steps.append(t2 - t1)
                flops.append(counter.step([pack]))
                tokens.append(sum(pack.lengths))
        totals = torch.tensor([sum(flops), sum(tokens)], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(totals)
        wall = sum(waits) + sum(steps)
        peak = peak_tflops(trainer.device, args.peak_tflops)
        row.update(
            steps=args.steps,
            step_s=round(statistics.median(steps), 4),
            tokens_per_s=round(float(totals[1]) / wall, 1),
            model_tflops_per_s_per_gpu=float(f"{float(totals[0]) / wall / world / 1e12:.4g}"),
            mfu=round(float(totals[0]) / wall / world / (peak * 1e12), 4) if peak else None,
            data_wait_fraction=round(sum(waits) / wall, 4),
            peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        )
        if compile_:
            row["compile_counts"] = counts.read()
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
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--ac", nargs="+", default=["none", "selective", "full"], choices=["none", "selective", "full"]
    )
    p.add_argument(
        "--compile", nargs="+", default=None, choices=["off", "on"], help="default: off on (--smoke: off)"
    )
    p.add_argument(
        "--attn",
        default=None,
        help="the language model's attention backend: mmloom_varlen, "
        "flash_attention_2, mmloom_packed, sdpa (default: trainer/attention.py's choice)",
    )
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--samples", type=int, default=3000, help="samples in the benchmark's shard set")
    p.add_argument(
        "--workers", type=int, default=None, help="data workers per rank (default: cores / ranks - 1)"
    )
    p.add_argument("--train-vision", action="store_true", help="train the vision tower too (default: frozen)")
    p.add_argument(
        "--peak-tflops", type=float, default=0.0, help="the device's dense bf16 peak, if not in the table"
    )
    p.add_argument(
        "--smoke", action="store_true", help="on CPU: the tiny Qwen2-VL, 2 steps per configuration"
    )
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not torch.cuda.is_available() and not args.smoke:
        print(
            "benchmarks/gpu/mfu.py: no GPU here (torch.cuda.is_available() is False); nothing measured",
            file=sys.stderr,
        )
        print(json.dumps({"benchmark": "gpu_mfu", "skipped": "no GPU"}))
        return 0
    if args.smoke:
        args.max_tokens, args.steps, args.warmup, args.samples = 2048, 2, 1, 60
    args.compile = args.compile or (["off"] if args.smoke else ["off", "on"])
    if args.attn:
        from trainer import attention
        from trainer.models.adapter import ModelAdapter

        attention.register()
        ModelAdapter.attn_implementation = lambda self: attention.per_module(self.config, args.attn)
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
        result: dict[str, Any] = {
            "benchmark": "gpu_mfu",
            "smoke": args.smoke,
            "world": world,
            "max_tokens": args.max_tokens,
            "train_vision": args.train_vision,
        }
        if torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
            result.update(
                device=torch.cuda.get_device_name(),
                peak_bf16_tflops=peak_tflops(device, args.peak_tflops),
                matmul_tflops=round(matmul_tflops(), 1),
                torch=torch.__version__,
            )
        runs, counts = [], CompileCounts()
        for compile_ in args.compile:
            for ac in args.ac:
                runs.append(
                    run_config(
                        args,
                        ckpt,
                        shards,
                        root / f"run-{ac}-{compile_}",
                        ac,
                        compile_ == "on",
                        rank,
                        world,
                        counts,
                    )
                )
                if rank == 0:
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)  # progress
        from trainer.models.registry import get_adapter

        config = get_adapter(ckpt).config
        with torch.device("meta"):
            skeleton = get_adapter(ckpt).model_from_config()
        result["parameters"] = sum(q.numel() for q in skeleton.parameters())
        result["text_layers"] = config.text_config.num_hidden_layers
        result["vision_depth"] = config.vision_config.depth
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
