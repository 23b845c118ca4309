"""Does a configuration fit on 80 GB GPUs, and how much host RAM does loading take? Predictions for the
real Qwen2.5-VL sizes, counted from the module tree built on the meta device (no weights, no download).

    python benchmarks/memory.py [--tokens 8192]

One JSON line per configuration, then a summary line. Each model is built with
`Qwen2_5_VLForConditionalGeneration` from its published config.json values (below) through the
family adapter; LoRA comes from trainer/lora.py (peft, on the meta device), what trains from
trainer/model.py's `freeze`, the FSDP units from trainer/parallel.py's `transformer_blocks`, what
QLoRA quantizes from the adapter's `quant_skip_modules`. The memory plan modelled, per rank:

- trained parameters: fp32 masters sharded by FSDP2 over the shard group (S ranks: all GPUs, or
  train.shard_group with HSDP); fp32 gradients and AdamW's exp_avg + exp_avg_sq sharded alike.
  LoRA/QLoRA reduce gradients once a step: with grad_accum > 1 a rank also holds them unsharded.
- frozen parameters: bf16, sharded over S; QLoRA's 4-bit NF4 decoder-layer linear weights
  (double quant: 4.127 bits a weight) are whole on every rank (kept out of FSDP).
- unsharded working set (bf16 compute): the root unit (everything outside the transformer blocks:
  embeddings, lm_head, final norm, merger, patch embedding) gathered for the whole step, two
  blocks gathered at once (current + prefetched), the unsharded gradients of the root and of one
  block (bf16, and their fp32 copy for the reduce-scatter); QLoRA adds one dequantized linear.
- activations: full activation checkpointing of every block: each block's input is kept, plus the
  peak of recomputing and back-propagating one block (`block_peak_bytes`), varlen attention.
- cross-entropy chunked over train.loss_chunk target positions: chunk x vocab x fp32 x 3.
The parts are summed (a conservative total: some never coincide). `fits_80gb`: total + 6 GiB
(CUDA context, NCCL buffers, allocator fragmentation) <= 79.6 GiB, an H100 80GB's 81,559 MiB.
Loading: rank 0 reads the bf16 checkpoint into host RAM and broadcasts it tensor by tensor through a
pinned buffer the size of the largest tensor; other ranks build on the meta device. QLoRA: every
rank quantizes its own copy straight to its GPU, streaming one 5 GB safetensors file at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import FinetuneConfig, LoraConfig
from trainer.models.adapter import ModelAdapter
from trainer.models.registry import get_adapter
from trainer.parallel import transformer_blocks

GIB = 2**30
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # codes + uint8 absmax per 64 weights + fp32 absmax per 256 blocks
GPU_GIB = 81559 / 1024  # H100 80GB (nvidia-smi: 81,559 MiB)
ALLOWANCE_GIB = 6.0  # CUDA context, NCCL buffers, fragmentation
GPUS_PER_NODE = 8
SAFETENSORS_FILE_GB = 5.0  # a QLoRA rank's host footprint: one checkpoint file at a time
LOSS_CHUNK = 1024  # train.loss_chunk
IMAGE_SHARE = 0.5  # of the tokens of a micro-batch
TARGET_SHARE = 0.5  # of the text tokens: the answers

# config.json of the published checkpoints (the rest is Qwen2_5_VLConfig's defaults, which match them).
VISION = dict(
    depth=32,
    hidden_size=1280,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    hidden_act="silu",
    in_chans=3,
)
MODELS = {
    "Qwen/Qwen2.5-VL-7B-Instruct": (
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
        dict(VISION, intermediate_size=3420, out_hidden_size=3584),
    ),
    "Qwen/Qwen2.5-VL-32B-Instruct": (
        dict(
            hidden_size=5120,
            intermediate_size=27648,
            num_hidden_layers=64,
            num_attention_heads=40,
            num_key_value_heads=8,
            vocab_size=152064,
        ),
        dict(VISION, intermediate_size=3456, out_hidden_size=5120),
    ),
    "Qwen/Qwen2.5-VL-72B-Instruct": (
        dict(
            hidden_size=8192,
            intermediate_size=29568,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=152064,
        ),
        dict(VISION, intermediate_size=3456, out_hidden_size=8192),
    ),
}


@dataclass(frozen=True, kw_only=True)
class Run:
    model: str
    method: str  # full (vision frozen, merger + language model trained) | lora | qlora
    gpus: int
    grad_accum: int
    shard_group: int
    lora_r: int = 64
    required: bool = True  # False: shown for comparison, not held to the 80 GB bar


RUNS = (
    Run(model="Qwen/Qwen2.5-VL-7B-Instruct", method="full", gpus=8, grad_accum=1, shard_group=8),
    Run(model="Qwen/Qwen2.5-VL-32B-Instruct", method="full", gpus=16, grad_accum=4, shard_group=16),
    Run(
        model="Qwen/Qwen2.5-VL-32B-Instruct",
        method="full",
        gpus=16,
        grad_accum=4,
        shard_group=8,
        required=False,
    ),  # HSDP: sharded within each node of 8, replicated across the two
    Run(model="Qwen/Qwen2.5-VL-72B-Instruct", method="lora", gpus=8, grad_accum=4, shard_group=8),
    Run(model="Qwen/Qwen2.5-VL-72B-Instruct", method="qlora", gpus=8, grad_accum=4, shard_group=8),
)


def elements(p: torch.Tensor) -> int:
    """Weights a parameter stands for (a bitsandbytes Params4bit stores two per byte)."""
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


def shard_elements(p: torch.Tensor, shard: int) -> int:
    """Elements of FSDP2's shard on one rank: dim 0 split in `shard` padded chunks."""
    if p.dim() == 0:
        return p.numel()
    return math.ceil(p.shape[0] / shard) * math.prod(p.shape[1:])


def state_bytes(
    model: nn.Module, trainable: set[str], quantized: set[str], shard: int = 1, unsharded_grads: bool = False
) -> dict[str, float]:
    """Bytes one rank holds between steps: parameters by dtype, fp32 gradients, AdamW's two fp32 states.
    `trainable` and `quantized` are parameter names; `unsharded_grads`: gradients also kept whole
    between micro-batches (once-a-step reduce). Works on a meta or a real module."""
    out = dict.fromkeys(("params_fp32", "params_bf16", "params_4bit", "gradients", "optimizer"), 0.0)
    for name, p in model.named_parameters():
        if name in quantized:
            out["params_4bit"] += elements(p) * NF4_BITS / 8
        elif name in trainable:
            n = shard_elements(p, shard)
            out["params_fp32"] += 4 * n
            out["gradients"] += 4 * n + (4 * p.numel() if unsharded_grads and shard > 1 else 0)
            out["optimizer"] += 8 * n
        else:
            out["params_bf16"] += 2 * shard_elements(p, shard)
    return out


def working_bytes(
    model: nn.Module, trainable: set[str], quantized: set[str], adapter: ModelAdapter | None = None
) -> dict[str, float]:
    """Bytes gathered during forward/backward: root unit + two blocks in bf16, the unsharded bf16
    gradients of the root and one block with their fp32 reduce copy, a dequantized 4-bit linear."""
    units: dict[str, list[tuple[str, nn.Parameter]]] = {"": []}
    prefixes = {
        f"{name}.{i}.": f"{name}.{i}"
        for _, name, i in transformer_blocks(model)
        if adapter is None or not adapter.fsdp_root_block(name)
    }
    for name, p in model.named_parameters():
        unit = next((u for pre, u in prefixes.items() if name.startswith(pre)), "")
        units.setdefault(unit, []).append((name, p))

    def gathered(unit: str) -> int:
        return sum(p.numel() for n, p in units[unit] if n not in quantized)

    def grads(unit: str) -> int:
        return sum(p.numel() for n, p in units[unit] if n in trainable)

    blocks = [u for u in units if u]
    biggest = max(blocks, key=gathered) if blocks else ""
    dequantized = max((elements(p) for n, p in model.named_parameters() if n in quantized), default=0)
    return {
        "params": 2 * (gathered("") + 2 * gathered(biggest)) + 2 * dequantized,
        "gradients": (2 + 4) * (grads("") + max((grads(u) for u in blocks), default=0)),
    }


def block_peak_bytes(tokens: int, hidden: int, inter: int, kv_width: int, heads: int) -> int:
    """One Llama/Qwen2-style block (RMSNorm, attention, RMSNorm, SwiGLU MLP) recomputed for backward:
    what its forward saves for backward plus the gradients alive at once in the MLP's backward."""
    per_token = {
        "input_layernorm: fp32 input + bf16 output": 4 * hidden + 2 * hidden,
        "q, k, v after rope": 2 * (hidden + 2 * kv_width),
        "attention output + fp32 logsumexp per head": 2 * hidden + 4 * heads,
        "residual sum after attention": 2 * hidden,
        "post_attention_layernorm: fp32 input + bf16 output": 4 * hidden + 2 * hidden,
        "gate, up, act(gate), act(gate) * up": 4 * 2 * inter,
        "MLP backward: gradients of act*up, act(gate), up": 3 * 2 * inter,
        "gradients of the block's output and input": 2 * 2 * hidden,
    }
    return tokens * sum(per_token.values())


def activation_bytes(config, tokens: int, vision_trained: bool, merger_trained: bool) -> dict[str, float]:
    """Activations of one micro-batch of `tokens` tokens under full activation checkpointing."""
    text, vis = config.text_config, config.vision_config
    hidden, image_tokens = text.hidden_size, int(tokens * IMAGE_SHARE)
    patches = image_tokens * vis.spatial_merge_size**2
    llm_kept = text.num_hidden_layers * tokens * hidden * 2
    head_dim = hidden // text.num_attention_heads
    llm_peak = block_peak_bytes(
        tokens, hidden, text.intermediate_size, text.num_key_value_heads * head_dim, text.num_attention_heads
    )
    # A frozen tower runs without an autograd graph: one block's tensors at a time, before the LLM.
    vision_kept = vis.depth * patches * vis.hidden_size * 2 if vision_trained else 0
    vision_peak = block_peak_bytes(
        patches, vis.hidden_size, vis.intermediate_size, vis.hidden_size, vis.num_heads
    )
    model_level = {
        "pixel_values fp32": patches * 3 * vis.temporal_patch_size * vis.patch_size**2 * 4,
        "inputs_embeds, merged with the image features": 2 * tokens * hidden * 2,
        "final norm: fp32 input + bf16 output": tokens * hidden * 6,
        # ln_q (fp32 input + bf16 output) and the MLP's hidden layer before and after GELU
        "merger, when trained": patches * vis.hidden_size * (6 + 2 * 2) if merger_trained else 0,
    }
    return {
        "llm_kept": llm_kept,
        "vision_kept": vision_kept,
        "model_level": sum(model_level.values()),
        "block_peak": max(llm_peak, vision_peak),
        "patches": patches,
        "image_tokens": image_tokens,
    }


def config_dir(name: str, out: Path) -> Path:
    """A config-only checkpoint directory of a published model, for the family adapter."""
    from transformers import Qwen2_5_VLConfig

    text, vision = MODELS[name]
    Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False).save_pretrained(out)
    return out


def build(adapter: ModelAdapter, run: Run) -> tuple[nn.Module, set[str], set[str], int, int]:
    """(model on meta, trainable names, quantized names, checkpoint parameters, largest tensor) for a run."""
    from trainer.lora import apply_lora, lora_config
    from trainer.model import freeze

    with torch.device("meta"):
        model = adapter.model_from_config(dtype=torch.bfloat16)
        base = sum(p.numel() for p in model.parameters())
        largest = max(p.numel() for p in model.parameters())
        quantized_ids = set()
        if run.method == "qlora":  # bitsandbytes replaces every nn.Linear outside the skipped modules
            skip = adapter.quant_skip_modules()
            quantized_ids = {
                id(m.weight)
                for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skip)
            }
        ft = FinetuneConfig(method=run.method, lora=LoraConfig(r=run.lora_r, alpha=2 * run.lora_r))
        if run.method != "full":
            model = apply_lora(model, lora_config(adapter, model, ft))
    freeze(model, adapter, types.SimpleNamespace(finetune=ft))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    quantized = {n for n, p in model.named_parameters() if id(p) in quantized_ids}
    return model, trainable, quantized, base, largest


def measure(adapter: ModelAdapter, run: Run, tokens: int) -> dict:
    """The JSON line of one configuration."""
    model, trainable, quantized, base, largest = build(adapter, run)
    config = adapter.config
    lora = run.method != "full"
    # LoRA/QLoRA reduce once a step (train.grad_reduce=auto): between micro-batches gradients stay whole.
    state = state_bytes(
        model, trainable, quantized, run.shard_group, unsharded_grads=lora and run.grad_accum > 1
    )
    work = working_bytes(model, trainable, quantized, adapter)
    trained_groups = {adapter.param_group(n) for n in trainable}
    act = activation_bytes(config, tokens, "vision" in trained_groups, "projector" in trained_groups)
    text_tokens = tokens - act["image_tokens"]
    targets = int(text_tokens * TARGET_SHARE)
    vocab = config.text_config.vocab_size
    per_rank = {
        **state,
        "unsharded_working": work["params"] + work["gradients"],
        "activations": act["llm_kept"] + act["vision_kept"] + act["model_level"] + act["block_peak"],
        "cross_entropy": min(LOSS_CHUNK, targets) * vocab * 4 * 3,
    }
    per_rank["total"] = sum(per_rank.values())
    checkpoint = 2 * base
    if run.method == "qlora":
        host = min(run.gpus, GPUS_PER_NODE) * SAFETENSORS_FILE_GB * 1e9
    else:
        host = checkpoint + 2 * largest
    n_trainable = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    return {
        "benchmark": "memory",
        "model": run.model,
        "method": run.method,
        "gpus": run.gpus,
        "grad_accum": run.grad_accum,
        "tokens": tokens,
        "shard_group": run.shard_group,
        "hsdp": run.shard_group < run.gpus,
        "required": run.required,
        "params": base,
        "trainable_params": n_trainable,
        "quantized_params": sum(elements(p) for n, p in model.named_parameters() if n in quantized),
        "per_rank_gib": {k: round(v / GIB, 2) for k, v in per_rank.items()},
        "activations_gib": {
            k: round(act[k] / GIB, 2) for k in ("llm_kept", "vision_kept", "model_level", "block_peak")
        },
        "fits_80gb": per_rank["total"] / GIB + ALLOWANCE_GIB <= GPU_GIB,
        "headroom_gib": round(GPU_GIB - ALLOWANCE_GIB - per_rank["total"] / GIB, 2),
        "ce_unchunked_gib": round(targets * vocab * (2 + 4 + 4) / GIB, 2),
        "checkpoint_gib": round(n_trainable * (4 + 8) / GIB, 2),
        "bf16_checkpoint_gib": round(checkpoint / GIB, 2),
        "host_gib_per_node": round(host / GIB, 2),
        "host_ratio": round(host / checkpoint, 3),
        "assumptions": {
            "image_share": IMAGE_SHARE,
            "image_tokens": act["image_tokens"],
            "patches": act["patches"],
            "targets": targets,
            "target_share_of_text": TARGET_SHARE,
            "loss_chunk": LOSS_CHUNK,
            "lora_r": run.lora_r if lora else None,
            "allowance_gib": ALLOWANCE_GIB,
            "gpu_gib": round(GPU_GIB, 2),
            "gpus_per_node": GPUS_PER_NODE,
            "per_rank_total": "the sum of the parts (conservative: some never coincide)",
            "host": (
                f"each rank streams one {SAFETENSORS_FILE_GB:g} GB safetensors file"
                if run.method == "qlora"
                else "rank 0's node: bf16 checkpoint + pinned buffer of the largest tensor; other nodes ~0"
            ),
        },
    }


SUMMARY_KEYS = (
    "model",
    "method",
    "gpus",
    "shard_group",
    "required",
    "fits_80gb",
    "per_rank_gib",
    "trainable_params",
    "quantized_params",
    "checkpoint_gib",
    "host_gib_per_node",
    "bf16_checkpoint_gib",
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--tokens", type=int, default=8192, help="tokens per packed micro-batch (data.packing.max_tokens)"
    )
    args = p.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {name: get_adapter(config_dir(name, Path(tmp) / name.split("/")[-1])) for name in MODELS}
        for run in RUNS:
            lines.append(measure(adapters[run.model], run, args.tokens))
            print(json.dumps(lines[-1]), flush=True)
    required = [x for x in lines if x["required"]]
    print(
        json.dumps(
            {
                "benchmark": "memory",
                "summary": True,
                "tokens": args.tokens,
                "all_fit_80gb": all(x["fits_80gb"] for x in required),
                "host_bar_1_15": all(x["host_ratio"] <= 1.15 for x in lines),
                "configs": [{k: x[k] for k in SUMMARY_KEYS} for x in lines],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
