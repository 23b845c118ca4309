"""Model FLOPs of a training step, from each pack's own sample lengths and media: perf/mfu.

    counter = flops.counter(model, adapter)       # read once from the model, cached per model
    step = counter.step(packs)                    # host arithmetic on the packs, no device work
    mfu = step / (seconds * peak_tflops(device) * 1e12)

Counted per pack (the grey image of a text-only pack and activation recomputation are not the
model's work, and are not counted):
- language model: 2 x matmul parameters per token (the embedding lookup excluded); lm_head the same
  for the positions that predict a target (the only ones the trainer projects); attention
  4 x pairs x heads x head_dim per attention layer, where pairs are each sample's causal query-key
  pairs, L(L+1)/2 for a sample of L tokens (not the packed row's: samples do not attend to each
  other), fewer in a sliding window's layers;
- projector: 2 x parameters per media token it hands the language model;
- vision tower: 2 x matmul parameters (patch embedding included) per patch, and attention
  4 x n^2 x width per layer for each frame of n patches (full attention; Qwen2.5-VL's windowed
  layers are counted as full).
Backward: a matmul computes the gradient of its input once anything before it in the data flow
(vision tower, projector, language model, lm_head) trains, as autograd's requires_grad spreads (the
pixels and a frozen tower's features need none), and the gradient of its weight where the weight
trains: a full finetune's trained matmul costs 3x its forward, a LoRA base weight 2x, a frozen tower
1x. Attention's backward costs 2x its forward.
Matmul parameters are those of nn.Linear and nn.ConvNd modules (LoRA's and bitsandbytes' layers are
Linear); bare matmul parameters (Gemma 3's projector weight), MoE experts and cross-attention to the
image (Llama 3.2 Vision) are not counted.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer.parallel import unwrapped_name

if TYPE_CHECKING:
    from trainer.data.packing import Pack
    from trainer.models.adapter import ModelAdapter

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s); the first name found in the
# device's name wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.4),
    ("H100", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
)
# Parameter groups in the order data flows through them (patch_embed: the vision tower's convolutions).
CHAIN = ("patch_embed", "vision", "projector", "llm", "lm_head")


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """The device's dense bf16 peak in TFLOP/s: `override` when set, else the table's figure for a
    known CUDA device, else None."""
    if override:
        return override
    if device.type != "cuda":
        return None
    return _table_peak(torch.cuda.get_device_name(device))


@functools.cache
def _table_peak(name: str) -> float | None:
    return next((value for key, value in PEAK_BF16_TFLOPS if key in name), None)


def causal_pairs(length: int, window: int | None = None) -> int:
    """Query-key pairs of causal attention over `length` tokens, each seeing at most `window`."""
    if window is None or window >= length:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


@dataclass(frozen=True)
class ModelFlops:
    """What a model's step FLOPs depend on, read once from the model (see the module docstring)."""

    forward: dict[str, int]  # matmul parameters by group (CHAIN)
    backward: dict[str, int]  # the same, each weighted by its matmuls in backward (0, 1 or 2)
    attention_backward: dict[str, bool]  # backward runs through the group's attention ("llm", "vision")
    text_width: int  # heads x head_dim of the language model's attention (of its first layer)
    text_layers: tuple[tuple[int, int | None], ...]  # (attention layers, sliding window or None)
    text_widths: tuple[int, ...]  # heads x head_dim of each text_layers group (Gemma 4's differ)
    vision_width: int
    vision_depth: int
    patch_size: tuple[int, int]  # (height, width) in pixels; (0, 0) without a vision tower
    class_token: int  # 1 when the tower prepends a class token to each frame
    media_tokens: tuple[int, ...]  # token ids of the image / video placeholders

    @classmethod
    def of(cls, model: nn.Module, adapter: ModelAdapter) -> ModelFlops:
        config = adapter.config
        counts = matmul_counts(model, adapter)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vision = getattr(config, "vision_config", None)
        names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
        ids = (getattr(config, name, None) for name in names)
        return cls(
            forward={g: counts[g][0] for g in CHAIN},
            backward={g: counts[g][1] for g in CHAIN},
            attention_backward={"llm": counts["llm"][2], "vision": counts["vision"][2]},
            text_width=_width(text),
            text_layers=_attention_layers(text),
            text_widths=_attention_widths(text),
            vision_width=(getattr(vision, "embed_dim", None) or getattr(vision, "hidden_size", 0)),
            vision_depth=(getattr(vision, "depth", None) or getattr(vision, "num_hidden_layers", 0)),
            patch_size=_pair(getattr(vision, "patch_size", 0) or 0),
            class_token=int(any(n.endswith("class_embedding") for n, _ in model.named_parameters())),
            media_tokens=tuple(sorted({i for i in ids if isinstance(i, int) and i >= 0})),
        )

    def frames(self, pack: Pack) -> list[int]:
        """Patches of each frame the vision tower attends over (none for a text-only pack)."""
        if pack.dummy:
            return []
        inputs, frames = pack.inputs, []
        for grids, pixels in (
            (inputs.get("image_grid_thw"), inputs.get("pixel_values")),
            (inputs.get("video_grid_thw"), inputs.get("pixel_values_videos")),
        ):
            if isinstance(grids, torch.Tensor):  # Qwen-VL: (frames, height, width) in patches
                frames += [h * w for t, h, w in grids.tolist() for _ in range(t)]
            elif isinstance(pixels, torch.Tensor) and pixels.ndim >= 4 and all(self.patch_size):
                n = (pixels.shape[-2] // self.patch_size[0]) * (pixels.shape[-1] // self.patch_size[1])
                frames += [n + self.class_token] * math.prod(pixels.shape[:-3])
            elif isinstance(pixels, torch.Tensor) and pixels.ndim == 3:
                # Pictures already cut into patches (Gemma 4): [pictures, patches, patch pixels], padded
                # patches included (the tower computes them, masked).
                frames += [pixels.shape[1]] * pixels.shape[0]
        return frames

    def applied(self, pack: Pack) -> dict[str, int]:
        """Positions each group's matmuls apply to in one pack: patches (patch_embed; vision, with
        a class token), media tokens (projector), tokens (llm), targets (lm_head)."""
        tokens, frames = sum(pack.lengths), self.frames(pack)
        media = 0
        if frames:
            ids = pack.inputs["input_ids"].reshape(-1)[:tokens]
            media = sum(int((ids == i).sum()) for i in self.media_tokens)
        return {
            "patch_embed": sum(frames) - self.class_token * len(frames),
            "vision": sum(frames),
            "projector": media,
            "llm": tokens,
            "lm_head": pack.targets,
        }

    def forward_flops(self, pack: Pack) -> dict[str, int]:
        """Forward FLOPs of one pack by part."""
        applied, frames = self.applied(pack), self.frames(pack)
        pairs_width = sum(
            n * causal_pairs(length, window) * width
            for (n, window), width in zip(self.text_layers, self.text_widths)
            for length in pack.lengths
        )
        return {
            "llm_linear": 2 * self.forward["llm"] * applied["llm"],
            "lm_head": 2 * self.forward["lm_head"] * applied["lm_head"],
            "llm_attention": 4 * pairs_width,
            "vision_linear": 2 * sum(self.forward[g] * applied[g] for g in ("patch_embed", "vision")),
            "vision_attention": 4 * sum(n * n for n in frames) * self.vision_width * self.vision_depth,
            "projector": 2 * self.forward["projector"] * applied["projector"],
        }

    def step(self, packs: Sequence[Pack]) -> float:
        """Model FLOPs of forward and backward over these packs (one rank's micro-batches)."""
        total = 0
        for pack in packs:
            applied, parts = self.applied(pack), self.forward_flops(pack)
            total += sum(2 * (self.forward[g] + self.backward[g]) * applied[g] for g in CHAIN)
            for group in ("llm", "vision"):
                total += parts[f"{group}_attention"] * (3 if self.attention_backward[group] else 1)
        return float(total)


def matmul_counts(model: nn.Module, adapter: ModelAdapter) -> dict[str, tuple[int, int, bool]]:
    """Per group of CHAIN: (matmul parameters, the same weighted by the matmuls backward does for each,
    whether backward runs through the group's end)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # (matmul elements or 0, whether the module's own parameters train), in module order per group
    modules: dict[str, list[tuple[int, bool]]] = {g: [] for g in CHAIN}
    if isinstance(head, nn.Linear):
        modules["lm_head"].append((_elements(head.weight), head.weight.requires_grad))
    seen: set[int] = set()  # a tied embedding still counts: it makes the gradient flow
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not own or module is head or ".original_module." in f".{name}.":  # peft's unused frozen copy
            continue
        seen.update(map(id, own))
        group = adapter.param_group(unwrapped_name(name) + ".weight")
        matmul = isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
        if matmul and group == "vision" and isinstance(module, nn.modules.conv._ConvNd):
            group = "patch_embed"
        modules[group].append((_elements(module.weight) if matmul else 0, any(p.requires_grad for p in own)))
    # A matmul's input gradient is computed once anything before it in the data flow trains (as
    # autograd's requires_grad spreads); the pixels need none.
    out, flowing = {}, False
    for group in CHAIN:
        forward = weighted = 0
        for n, trains in modules[group]:
            forward += n
            weighted += n * (int(flowing) + int(trains))
            flowing = flowing or trains
        out[group] = (forward, weighted, flowing)
    return out


_COUNTERS: weakref.WeakKeyDictionary[nn.Module, ModelFlops] = weakref.WeakKeyDictionary()


def counter(model: nn.Module, adapter: ModelAdapter) -> ModelFlops:
    """The model's ModelFlops, read from it on the first call only."""
    if model not in _COUNTERS:
        _COUNTERS[model] = ModelFlops.of(model, adapter)
    return _COUNTERS[model]


def _width(text: Any, layer: int = 0) -> int:
    """heads x head_dim of the attention of layer `layer`. A config with per-layer values
    (transformers' per_layer_config: Gemma 4's full-attention heads are twice as wide) refuses to
    give its global head_dim, so those are read from the layer's own config."""
    if getattr(text, "is_heterogeneous", False):
        text = text.per_layer_config[layer]
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_attention_heads * head_dim


def _attention_widths(text: Any) -> tuple[int, ...]:
    """heads x head_dim of each group `_attention_layers` gives, read from the group's first layer."""
    kinds = getattr(text, "layer_types", None)
    if not kinds:
        return (_width(text),)
    return tuple(_width(text, kinds.index(k)) for k in ("full_attention", "sliding_attention") if k in kinds)


def _attention_layers(text: Any) -> tuple[tuple[int, int | None], ...]:
    """(count, window) of the language model's self-attention layers: full ones, sliding-window ones;
    linear-attention and cross-attention layers have no pairwise attention to count here."""
    kinds = getattr(text, "layer_types", None)
    if not kinds:
        cross = len(getattr(text, "cross_attention_layers", None) or ())
        return ((text.num_hidden_layers - cross, None),)
    layers = (
        (sum(k == "full_attention" for k in kinds), None),
        (sum(k == "sliding_attention" for k in kinds), getattr(text, "sliding_window", None)),
    )
    return tuple((n, window) for n, window in layers if n)


def _elements(p: torch.Tensor) -> int:
    """Weights a parameter stands for (a bitsandbytes Params4bit stores two per byte)."""
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


def _pair(size: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """A patch size as (height, width): InternViT's config gives [14, 14], most others 14."""
    return (int(size[0]), int(size[-1])) if isinstance(size, (list, tuple)) else (int(size), int(size))
