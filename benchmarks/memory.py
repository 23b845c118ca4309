"""Does a configuration fit on 80 GB GPUs, and how much host RAM does loading take? Predictions for the
real Qwen2.5-VL sizes and two mixture-of-experts VLMs (Qwen3-VL-30B-A3B, Qwen3.5-35B-A3B), counted
from the module tree built on the meta device (no weights, no download).

    python benchmarks/memory.py [--tokens 8192]

One JSON line per configuration, then a summary line. Each model is built from its published
config.json values (`MODELS`: the transformers config class and the values) through the family
adapter; LoRA comes from trainer/lora.py (peft, on the meta device), what trains from
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
  peak of recomputing and back-propagating one block (`block_peak_bytes`, `moe_block_peak_bytes`),
  varlen attention.
- cross-entropy chunked over train.loss_chunk target positions: chunk x vocab x fp32 x 3.
The parts are summed (a conservative total: some never coincide). `fits_80gb`: total + 6 GiB
(CUDA context, NCCL buffers, allocator fragmentation) <= 79.6 GiB, an H100 80GB's 81,559 MiB.
Loading: rank 0 reads the bf16 checkpoint into host RAM and broadcasts it tensor by tensor through a
pinned buffer the size of the largest tensor; other ranks build on the meta device. QLoRA: every
rank quantizes its own copy straight to its GPU, streaming one 5 GB safetensors file at a time.

Mixture of experts (trainer/moe.py). The experts are 3-D parameters of their decoder layer, so FSDP2
shards them (dim 0, the experts) with the layer's unit, and the gathered working set of one block holds
ALL its experts, twice with prefetch. A block's activations add the router (logits and fp32 softmax,
tokens x experts), the grouped GEMM's copies of the hidden states permuted by expert (top_k per
token), the experts' MLP intermediates for top_k x moe_intermediate_size per token, the shared
expert's MLP (Qwen3.5), and with `finetune.lora.experts` peft's merged expert weights W + BA and
their gradient (full size, per block). Every MoE layer's router logits are kept to the loss for the
load-balancing term. Qwen3.5's Gated DeltaNet layers (3 of 4) replace attention by the q/k/v/z/b/a
projections, the causal convolution and the chunked delta rule, whose per-chunk recurrent state
(value heads x key dim x value dim, fp32, one per 64 tokens) and its gradient dominate. QLoRA is
refused for MoE models (trainer/moe.py `refuse_quantized_experts`): no qlora rows for them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import types
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import FinetuneConfig, LoraConfig
from trainer.models.adapter import ModelAdapter
from trainer.models.registry import get_adapter
from trainer.moe import expert_parameters
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
DELTA_RULE_CHUNK = 64  # tokens a chunk in the gated delta rule (flash-linear-attention's and transformers')


@dataclass(frozen=True, kw_only=True)
class Published:
    """A published checkpoint: its transformers config class and its config.json values; what is left
    out is the class's default, which matches the checkpoint."""

    config_class: str  # in transformers
    text: dict
    vision: dict
    tie_word_embeddings: bool = False


# Qwen2.5-VL's config.json values (the rest is Qwen2_5_VLConfig's defaults, which match them).
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
# The Qwen3-VL / Qwen3.5 vision tower (SigLIP-2 shaped, GELU MLP), shared by both MoE checkpoints. Sources:
# InternLM/xtuner xtuner/v1/model/compose/qwen3_vl/qwen3_vl_config.py (Qwen3VLVisionConfig, used by its
# Qwen3VLMoE30BA3Config and, with no DeepStack, by compose/qwen3_5/qwen3_5_config.py's
# Qwen3_5_VLMoE35BA3Config; both projectors map to text width 2048); a public Rust port's unit test
# (repository not named by the code index) that transcribes Qwen/Qwen3-VL-30B-A3B-Instruct's config.json
# "byte-for-byte ... at commit 1fc78ad": these vision values, out_hidden_size 2048, and the text values
# below; transformers 5.25's Qwen3VLMoeVisionConfig and Qwen3_5MoeVisionConfig defaults (documented for
# these two checkpoints).
QWEN3_VISION = dict(
    depth=27,
    hidden_size=1152,
    intermediate_size=4304,
    num_heads=16,
    hidden_act="gelu_pytorch_tanh",
    in_channels=3,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=2304,
    out_hidden_size=2048,
)
MODELS = {
    "Qwen/Qwen2.5-VL-7B-Instruct": Published(
        config_class="Qwen2_5_VLConfig",
        text=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
        vision=dict(VISION, intermediate_size=3420, out_hidden_size=3584),
    ),
    "Qwen/Qwen2.5-VL-32B-Instruct": Published(
        config_class="Qwen2_5_VLConfig",
        text=dict(
            hidden_size=5120,
            intermediate_size=27648,
            num_hidden_layers=64,
            num_attention_heads=40,
            num_key_value_heads=8,
            vocab_size=152064,
        ),
        vision=dict(VISION, intermediate_size=3456, out_hidden_size=5120),
    ),
    "Qwen/Qwen2.5-VL-72B-Instruct": Published(
        config_class="Qwen2_5_VLConfig",
        text=dict(
            hidden_size=8192,
            intermediate_size=29568,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=152064,
        ),
        vision=dict(VISION, intermediate_size=3456, out_hidden_size=8192),
    ),
    # Every decoder layer: attention, then 128 experts (8 routed per token), no shared expert. Text values:
    # the config.json transcription above; xtuner's xtuner/v1/model/moe/qwen3.py Qwen3MoE30BA3Config (48
    # layers, hidden 2048, 32 query / 4 key-value heads of 128, 128 experts of 768, top-8, vocab 151936,
    # untied); slime-style Megatron args for Qwen3-VL-30B-A3B-Instruct (--num-layers 48 --hidden-size 2048
    # --num-query-groups 4 --kv-channels 128 --moe-ffn-hidden-size 768 --moe-router-topk 8 --num-experts
    # 128 --untie-embeddings-and-output-weights). Qwen3-30B-A3B's model card: 30.5B total, 3.3B active;
    # keras-team/keras-hub keras_hub/src/models/qwen3_omni/qwen3_omni_presets.py gives the same text
    # backbone 30,532,122,624 parameters, this module tree's language model exactly.
    "Qwen/Qwen3-VL-30B-A3B-Instruct": Published(
        config_class="Qwen3VLMoeConfig",
        text=dict(
            hidden_size=2048,
            intermediate_size=6144,  # unused: mlp_only_layers is empty, every layer is MoE
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            vocab_size=151936,
            tie_word_embeddings=False,
        ),
        vision=dict(QWEN3_VISION, deepstack_visual_indexes=[8, 16, 24]),
    ),
    # 40 layers: 10 x (3 Gated DeltaNet + 1 gated full attention), each followed by 256 experts (8 routed)
    # plus one shared expert behind a sigmoid gate. Sources: InternLM/xtuner
    # xtuner/v1/model/moe/qwen3_5_text.py Qwen3_5_VLTextMoE35BA3BConfig (vocab 248320, 40 layers, hidden
    # 2048, attention 16 / 2 heads of 256 with output gate, DeltaNet 32 value / 16 key heads of 128, conv 4,
    # 256 experts + 1 shared of 512, top-8, untied); a public inventory of the Qwen/Qwen3.5-35B-A3B
    # snapshot ec2d4ece's config.json (the same values, shared_expert_intermediate_size 512,
    # attn_output_gate true, full_attention_interval 4, mtp_num_hidden_layers 1); transformers 5.25's
    # Qwen3_5MoeTextConfig defaults (documented for this checkpoint); its docs: 35B total, 3B active.
    # Not verified against the file itself: the vision out_hidden_size (2048 from xtuner's projector,
    # the text width it must be), and the published total: transformers does not build the checkpoint's
    # multi-token-prediction layer (mtp.*, about 0.85B more in the safetensors).
    "Qwen/Qwen3.5-35B-A3B": Published(
        config_class="Qwen3_5MoeConfig",
        text=dict(
            hidden_size=2048,
            num_hidden_layers=40,
            full_attention_interval=4,
            num_attention_heads=16,
            num_key_value_heads=2,
            head_dim=256,
            attn_output_gate=True,  # read by activation_bytes; transformers always builds the gate
            linear_num_key_heads=16,
            linear_num_value_heads=32,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_conv_kernel_dim=4,
            num_experts=256,
            num_experts_per_tok=8,
            moe_intermediate_size=512,
            shared_expert_intermediate_size=512,
            vocab_size=248320,
            tie_word_embeddings=False,
        ),
        vision=dict(QWEN3_VISION),
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
    lora_experts: bool = False  # finetune.lora.experts: LoRA on every expert's 3-D weights too
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
    # The MoE models: the same global batch (32 packs of 8192 tokens) on 8 or 16 GPUs, QLoRA refused.
    *(
        row
        for model in ("Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen/Qwen3.5-35B-A3B")
        for row in (
            # Full finetuning on 8: the fp32 masters, gradients and AdamW states of 30.6B / 34.7B trained
            # weights alone are 57 / 65 GiB a rank; with the working set neither fits (0.8 / 15.8 GiB over).
            # 16 GPUs, sharded over all, is the required row.
            Run(model=model, method="full", gpus=8, grad_accum=4, shard_group=8, required=False),
            Run(model=model, method="full", gpus=16, grad_accum=2, shard_group=16),
            Run(model=model, method="lora", gpus=8, grad_accum=4, shard_group=8),
            Run(model=model, method="lora", gpus=8, grad_accum=4, shard_group=8, lora_experts=True),
        )
    ),
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


def vit_block_peak_bytes(tokens: int, hidden: int, inter: int, heads: int) -> int:
    """One Qwen3-VL vision block (LayerNorm, fused qkv attention with rope, LayerNorm, GELU MLP), counted
    as `block_peak_bytes` counts a block: saved for backward plus the MLP's gradients."""
    per_token = {
        "norm1: fp32 input + bf16 output": 6 * hidden,
        "qkv output, q and k after rope": 2 * 3 * hidden + 2 * 2 * hidden,
        "attention output + fp32 logsumexp per head": 2 * hidden + 4 * heads,
        "residual sum after attention": 2 * hidden,
        "norm2: fp32 input + bf16 output": 6 * hidden,
        "fc1, GELU(fc1)": 2 * 2 * inter,
        "MLP backward: gradients of GELU(fc1), fc1": 2 * 2 * inter,
        "gradients of the block's output and input": 2 * 2 * hidden,
    }
    return tokens * sum(per_token.values())


def attention_per_token(text) -> dict[str, int]:
    """Bytes per token of a Qwen3 full-attention layer (per-head q/k RMSNorm; Qwen3.5 gates its output)."""
    hidden, heads = text.hidden_size, text.num_attention_heads
    q_width, kv_width = heads * text.head_dim, text.num_key_value_heads * text.head_dim
    gated = bool(getattr(text, "attn_output_gate", False))
    projected = (1 + gated) * q_width + 2 * kv_width
    out = {
        "input_layernorm: fp32 input + bf16 output": 6 * hidden,
        "q, k, v projections (a gated q_proj yields the gate too)": 2 * projected,
        "q_norm, k_norm: fp32 inputs": 4 * (q_width + kv_width),
        "q, k, v after rope": 2 * (q_width + 2 * kv_width),
        "attention output + fp32 logsumexp per head": 2 * q_width + 4 * heads,
        "residual sum after attention": 2 * hidden,
    }
    if gated:
        out["output gate: sigmoid(gate), gated attention output"] = 2 * 2 * q_width
    return out


def linear_attention_per_token(text) -> dict[str, float]:
    """Bytes per token of a Gated DeltaNet layer (Qwen3.5) recomputed for backward: the projections, the
    causal convolution, the chunked gated delta rule (flash-linear-attention's algorithm, which
    transformers' fallback follows) and its gated RMSNorm."""
    hidden, dk, dv = text.hidden_size, text.linear_key_head_dim, text.linear_value_head_dim
    k_heads, v_heads = text.linear_num_key_heads, text.linear_num_value_heads
    key_dim, value_dim = k_heads * dk, v_heads * dv
    conv_dim = 2 * key_dim + value_dim  # q, k, v
    chunk_state = 4 * v_heads * dk * dv / DELTA_RULE_CHUNK  # fp32 [value heads, key dim, value dim] a chunk
    return {
        "input_layernorm: fp32 input + bf16 output": 6 * hidden,
        "in_proj_qkv: the conv's input (its state, the last 3 tokens, per sample)": 2 * conv_dim,
        "in_proj_z, in_proj_b, in_proj_a outputs": 2 * (value_dim + 2 * v_heads),
        "causal conv1d output and its SiLU: q, k, v": 2 * 2 * conv_dim,
        "decay g and beta per value head, fp32": 4 * 2 * v_heads,
        "q, k L2-normalised + fp32 reciprocal norms": 2 * 2 * key_dim + 4 * 2 * k_heads,
        "delta rule: intra-chunk matrix A (fp32, 64 a value head), decay cumsum": 4 * v_heads * 65,
        "delta rule: WY terms w (key dim), u and v_new (value dim) a value head": 2 * v_heads * (dk + 2 * dv),
        "delta rule: per-chunk state h and its gradient dh (fp32, one per 64 tokens)": 2 * chunk_state,
        "recurrence output; gated RMSNorm: fp32 input, output, SiLU(z)": 2 * value_dim + 3 * 4 * value_dim,
        "out_proj input": 2 * value_dim,
        "backward: gradients of q, k, v and of the conv input": 2 * 2 * conv_dim,
        "residual sum after linear attention": 2 * hidden,
    }


def moe_per_token(text) -> dict[str, int]:
    """Bytes per token of a sparse MoE block (router, top_k routed experts run as transformers' grouped
    GEMM, an optional shared expert) recomputed for backward."""
    hidden, experts, top_k = text.hidden_size, text.num_experts, text.num_experts_per_tok
    inter, shared = text.moe_intermediate_size, getattr(text, "shared_expert_intermediate_size", 0) or 0
    out = {
        "post_attention_layernorm: fp32 input + bf16 output": 6 * hidden,
        "router: bf16 logits, their fp32 softmax; top-k weights, int64 ids": 6 * experts + top_k * (2 + 8),
        "grouped GEMM: hidden states permuted by expert, top_k copies": 2 * top_k * hidden,
        "experts: gate_up output, act(gate), act(gate) * up, top_k a token": top_k * 2 * 4 * inter,
        "experts: down_proj output, its routing-weighted copy, top_k a token": 2 * 2 * top_k * hidden,
        "experts backward: gradients of act*up, act(gate), up, top_k a token": top_k * 3 * 2 * inter,
        "experts backward: gradients of the permuted inputs and the outputs": 2 * 2 * top_k * hidden,
        "gradients of the block's output and input": 2 * 2 * hidden,
    }
    if shared:
        out["shared expert: gate, up, act(gate), act(gate) * up, 3 gradients"] = 7 * 2 * shared
        out["shared expert gate: sigmoid, gated output"] = 2 * 2 + 2 * hidden
    return out


def moe_block_peak_bytes(text, tokens: int, layer_type: str, expert_lora: bool) -> int:
    """One MoE decoder layer (`layer_type` "full_attention" or "linear_attention") recomputed for
    backward. With LoRA on the experts, peft folds each expert weight with its adapter (W + s B A, one
    baddbmm, trainer/lora.py): the merged gate_up and down weights are saved for backward and the
    gradient of one of them is alive in it, full size whatever the tokens."""
    mixer = linear_attention_per_token if layer_type == "linear_attention" else attention_per_token
    per_token = {**mixer(text), **moe_per_token(text)}
    expert_weights = 3 * text.num_experts * text.moe_intermediate_size * text.hidden_size  # gate_up + down
    per_block = {
        "peft's merged expert weights (bf16), saved for backward": 2 * expert_weights if expert_lora else 0,
        "gradient of the merged gate_up weights (bf16)": 2 * expert_weights * 2 // 3 if expert_lora else 0,
    }
    return int(tokens * sum(per_token.values()) + sum(per_block.values()))


def activation_bytes(
    config, tokens: int, vision_trained: bool, merger_trained: bool, expert_lora: bool = False
) -> dict[str, float]:
    """Activations of one micro-batch of `tokens` tokens under full activation checkpointing.
    `expert_lora`: the experts carry LoRA adapters (finetune.lora.experts)."""
    text, vis = config.text_config, config.vision_config
    hidden, image_tokens = text.hidden_size, int(tokens * IMAGE_SHARE)
    patches = image_tokens * vis.spatial_merge_size**2
    llm_kept = text.num_hidden_layers * tokens * hidden * 2
    experts = getattr(text, "num_experts", 0)
    moe_layers = text.num_hidden_layers if experts else 0  # all layers are MoE here (no mlp_only_layers)
    if moe_layers:
        layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
        llm_peak = max(moe_block_peak_bytes(text, tokens, kind, expert_lora) for kind in layer_types)
    else:
        heads = text.num_attention_heads
        kv_width = text.num_key_value_heads * (hidden // heads)
        llm_peak = block_peak_bytes(tokens, hidden, text.intermediate_size, kv_width, heads)
    # A frozen tower runs without an autograd graph: one block's tensors at a time, before the LLM.
    vision_kept = vis.depth * patches * vis.hidden_size * 2 if vision_trained else 0
    if getattr(vis, "hidden_act", "silu") == "silu":  # Qwen2.5-VL: RMSNorm and SwiGLU blocks
        vision_peak = block_peak_bytes(
            patches, vis.hidden_size, vis.intermediate_size, vis.hidden_size, vis.num_heads
        )
    else:
        vision_peak = vit_block_peak_bytes(patches, vis.hidden_size, vis.intermediate_size, vis.num_heads)
    deepstack = len(getattr(vis, "deepstack_visual_indexes", None) or [])  # Qwen3-VL's tapped vision blocks
    model_level = {
        "pixel_values fp32": patches * 3 * vis.temporal_patch_size * vis.patch_size**2 * 4,
        "inputs_embeds, merged with the image features": 2 * tokens * hidden * 2,
        "final norm: fp32 input + bf16 output": tokens * hidden * 6,
        # ln_q (fp32 input + bf16 output) and the MLP's hidden layer before and after GELU
        "merger, when trained": patches * vis.hidden_size * (6 + 2 * 2) if merger_trained else 0,
        "DeepStack: tapped blocks' features at the image tokens": deepstack * image_tokens * hidden * 2,
        # trainer/moe.py asks for every MoE layer's router logits (output_router_logits) for the balance loss
        "router logits of all MoE layers (bf16), the loss's fp32 softmax": moe_layers * tokens * experts * 6,
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
    import transformers

    spec = MODELS[name]
    config_class = getattr(transformers, spec.config_class)
    config_class(
        text_config=spec.text, vision_config=spec.vision, tie_word_embeddings=spec.tie_word_embeddings
    ).save_pretrained(out)
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
        lora = LoraConfig(r=run.lora_r, alpha=2 * run.lora_r)
        if run.lora_experts:  # peft's adapters on 3-D parameters refuse lora_dropout != 0, as for a user
            lora = replace(lora, experts=True, dropout=0.0)
        ft = FinetuneConfig(method=run.method, lora=lora)
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
    # LoRA/QLoRA reduce once a step (train.grad_reduce=auto): between micro-batches gradients stay whole;
    # LoRA on every expert reduces after each micro-batch, as full finetuning does.
    state = state_bytes(
        model,
        trainable,
        quantized,
        run.shard_group,
        unsharded_grads=lora and not run.lora_experts and run.grad_accum > 1,
    )
    work = working_bytes(model, trainable, quantized, adapter)
    trained_groups = {adapter.param_group(n) for n in trainable}
    experts = set(expert_parameters(model))  # the base experts' 3-D weights (peft's adapters are 2-D)
    expert_lora = any(".experts." in n and "lora_" in n for n in trainable)  # finetune.lora.experts
    act = activation_bytes(
        config, tokens, "vision" in trained_groups, "projector" in trained_groups, expert_lora=expert_lora
    )
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
        "lora_experts": run.lora_experts,
        "gpus": run.gpus,
        "grad_accum": run.grad_accum,
        "tokens": tokens,
        "shard_group": run.shard_group,
        "hsdp": run.shard_group < run.gpus,
        "required": run.required,
        "params": base,
        "trainable_params": n_trainable,
        "expert_params": sum(p.numel() for n, p in model.named_parameters() if n in experts),
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
    "lora_experts",
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
