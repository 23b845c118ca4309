"""Attention for packed sequences: each packed sample attends within itself, from sample boundaries
found once per pack.

Collate (trainer/data/packing.py) writes a pack's boundaries into the model inputs as transformers'
packed-sequence kwargs, `cu_seq_lens_q/k` (int32 [samples + 1]) and `max_length_q/k` (an int), plus
`mmloom_segments` (the lengths as Python ints). They reach every attention layer of the language
model, so no layer reads tensor data back to the host. Backends, for the language model only (vision
towers keep SDPA: several families pass the kwargs on to their vision tower, whose sequences are
not the pack's, and Qwen's vision attention sets its own `cu_seqlens`):

- "flash_attention_2": CUDA with flash-attn installed, for families whose model class supports it;
  transformers' own varlen path takes the kwargs and skips its per-layer packing check.
- "mmloom_varlen": CUDA otherwise: torch's `varlen_attn` (flash-attention kernels shipped with
  torch, no flash-attn build), causal, sliding windows, GQA.
- "mmloom_packed": CPU: one SDPA call per sample, causal, with a banded mask for a sliding window.
- Gemma 3 (bidirectional image blocks) and PaliGemma (prefix-LM) need more than sample boundaries:
  collate hands them `mmloom_mask`, each token's sample and block ids, and once per forward the
  adapter's hook (ModelAdapter.prepare) turns those into the masks, with `block_causal`: flex_attention
  BlockMasks on CUDA (`choose_masked`; fully masked tiles are skipped), a dense boolean mask for SDPA
  elsewhere.
- "sdpa" for models whose layers are not plain or sliding-window attention.

A layer that is not causal self-attention over the packed row (mllama's cross-attention, an explicit
mask, several rows) goes to SDPA unchanged. A sliding window at least as long as a sample does not
cut it, so Phi-4-multimodal's 262,144-token window is no window.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

PACKED = "mmloom_packed"
VARLEN = "mmloom_varlen"
FLEX = "flex_attention"
LAYER_TYPES = {"full_attention", "sliding_attention"}


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from trainer.data.packing import PACKED_KWARGS

    for name in PACKED_KWARGS:
        kwargs.pop(name, None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _packed_row(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: Any,
    is_causal: bool | None,
    kwargs: dict,
) -> bool:
    """Whether this call is causal self-attention over one packed row with its boundaries given."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return (
        kwargs.get("cu_seq_lens_q") is not None
        and attention_mask is None
        and causal
        and query.shape[0] == 1
        and key.shape[2] == query.shape[2]
        and not kwargs.get("softcap")
    )


@torch.compiler.disable  # a Python loop over the pack's samples: compiled, it would recompile per make-up
def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Per-sample SDPA over [1, heads, tokens, dim] (the CPU backend)."""
    if not _packed_row(module, query, key, attention_mask, is_causal, kwargs):
        return _sdpa(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    # The lengths as Python ints from collate; a compiled block is not handed them (trainer/parallel.py:
    # Dynamo would recompile for every make-up), so they come from the CPU tensor of boundaries.
    sizes = kwargs.get("mmloom_segments") or kwargs["cu_seq_lens_q"].diff().tolist()
    window = kwargs.get("sliding_window")
    outputs = []
    # split, not slicing: a slice's backward writes its gradient into a zeroed tensor of the
    # whole row, once per sample; split's backward is one concatenation.
    for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2)):
        n = q.shape[2]
        mask = None
        if window and window < n:  # token i sees j when 0 <= i - j < window
            offset = torch.arange(n)[:, None] - torch.arange(n)[None, :]
            mask = ((offset >= 0) & (offset < window)).to(q.device)
        outputs.append(
            _sdpa(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=mask is None)[0]
        )
    return torch.cat(outputs, dim=1), None


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """torch's varlen flash kernel over the packed row (the CUDA backend without flash-attn)."""
    if not _packed_row(module, query, key, attention_mask, is_causal, kwargs) or (
        dropout and module.training
    ):
        return packed_attention(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    from torch.nn.attention.varlen import varlen_attn

    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    window = kwargs.get("sliding_window")
    window = window if window and window < longest else None
    if "window_size" in _parameters(varlen_attn):  # torch 2.14: causal is a window of (-1, 0)
        mask = {"window_size": (window - 1 if window else -1, 0)}
    elif window is None:  # older torch: is_causal, no windows
        mask = {"is_causal": True}
    else:
        return packed_attention(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
    gqa = {}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in _parameters(varlen_attn):
            gqa = {"enable_gqa": True}
        else:  # older torch: one key-value head per query head
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, **mask, **gqa)
    return out[None], None  # [1, tokens, heads, dim]


@functools.cache
def _parameters(fn: Any) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED, packed_attention)
    AttentionInterface.register(VARLEN, varlen_attention)


# Text-config fields of layers that carry state from token to token whatever the mask says: linear
# attention, state-space and short-convolution layers (Qwen3.5, Jamba, Falcon-H1, LFM2, ...).
RECURRENT_FIELDS = (
    "linear_conv_kernel_dim",
    "mamba_d_state",
    "mamba_d_ssm",
    "ssm_state_size",
    "conv_L_cache",
)


def packing_leaks(config: Any) -> str:
    """Why packed samples would see each other in this language model ("" when they cannot): a layer
    type other than full or sliding-window attention, or fields of recurrent layers. Restarting
    positions and per-sample attention keep attention layers apart, nothing keeps a recurrent state
    apart unless the layer takes the pack's boundaries, which mmloom has not checked for such models."""
    text = config.get_text_config()
    kinds = sorted(set(getattr(text, "layer_types", None) or ["full_attention"]) - LAYER_TYPES)
    if kinds:
        return f"its layer types {', '.join(kinds)} carry state from one token to the next"
    fields = [name for name in RECURRENT_FIELDS if getattr(text, name, None)]
    return f"its config describes recurrent layers ({', '.join(fields)})" if fields else ""


def plain_layers(config: Any) -> bool:
    """Whether the language model's layers are all full or sliding-window attention (no linear
    attention, no soft-capping), so sample boundaries and a window are all the mask they need."""
    text = config.get_text_config()
    if getattr(text, "attn_logit_softcapping", None):
        return False
    return all(kind in LAYER_TYPES for kind in getattr(text, "layer_types", None) or ["full_attention"])


def choose(config: Any, model_class: type | None, device: torch.device) -> str:
    """The language model's backend on `device` (see the module docstring)."""
    if not plain_layers(config):
        return "sdpa"
    register()
    if device.type != "cuda":
        return PACKED
    if importlib.util.find_spec("flash_attn") is not None:
        if getattr(model_class, "_supports_flash_attn", False):
            return "flash_attention_2"
        log_once(
            f"{getattr(model_class, '__name__', model_class)} does not support flash_attention_2: "
            f"attention goes through torch's varlen kernel instead"
        )
    return VARLEN


def choose_hybrid(config: Any, model_class: type | None, device: torch.device) -> str:
    """`choose` for a hybrid model whose linear-attention layers run once per packed sample
    (trainer/linear_attention.py) and take no attention backend: by its full-attention layers alone."""
    import copy

    attention_only = copy.deepcopy(config)
    text = attention_only.get_text_config()
    text.layer_types = ["full_attention"] * len(text.layer_types)
    return choose(attention_only, model_class, device)


def choose_masked(device: torch.device) -> str:
    """The backend of a family whose packed mask has bidirectional blocks (see `block_causal`)."""
    from transformers.utils import is_torch_flex_attn_available

    return FLEX if device.type == "cuda" and is_torch_flex_attn_available() else "sdpa"


def block_causal(ids: torch.Tensor, window: int | None, backend: str) -> Any:
    """The attention mask of a pack from `ids` [2, tokens]: each token's sample, and its block (-1 for
    none). Token q sees token kv of its own sample when kv <= q, or when both lie in one block; with
    `window`, only when q - kv < window. A flex_attention BlockMask for FLEX (built on the ids' device,
    its tiles found once per pack), otherwise a dense [1, 1, tokens, tokens] boolean mask for SDPA;
    both from the one rule below."""
    sample, block = ids[0], ids[1]

    def sees(batch: Any, head: Any, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        allowed = (sample[q] == sample[kv]) & ((kv <= q) | ((block[q] == block[kv]) & (block[q] >= 0)))
        return allowed & (q - kv < window) if window else allowed

    n = ids.shape[1]
    if backend == FLEX:
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(sees, None, None, n, n, device=ids.device)
    index = torch.arange(n, device=ids.device)
    return sees(None, None, index[:, None], index[None, :])[None, None]


def per_module(config: Any, backend: str) -> str | dict[str, str]:
    """transformers' attn_implementation: `backend` for the language model's config, SDPA for the
    other sub-configs (vision, audio)."""
    if backend == "sdpa":
        return backend
    subs = list(getattr(config, "sub_configs", {}) or {})
    text = config.get_text_config()
    key = next((k for k in subs if getattr(config, k, None) is text), "")
    impl = {k: "sdpa" for k in subs} | {key: backend}
    impl.setdefault("", "sdpa" if key else backend)
    return impl


@functools.cache
def log_once(message: str, level: int = logging.INFO) -> None:
    """`message`, once per process; not from data-loader workers, whose main process says it too."""
    if torch.utils.data.get_worker_info() is None:
        logger.log(level, message)


@contextlib.contextmanager
def count_host_reads(layers: Iterable[torch.nn.Module]) -> Iterator[list[str]]:
    """Inside, the returned list gets the name of every read of tensor data back to the host (`.item()`,
    `.tolist()`, `nonzero`, a tensor's truth value or int) made while one of `layers` runs its forward."""
    reads: list[str] = []
    depth = [0]

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if depth[0] and func in HOST_READS:
                reads.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    def enter(*_: Any) -> None:
        depth[0] += 1

    def leave(*_: Any) -> None:
        depth[0] -= 1

    handles = [
        h
        for layer in layers
        for h in (layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave))
    ]
    try:
        with Watch():
            yield reads
    finally:
        for handle in handles:
            handle.remove()


HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.nonzero,
    torch.Tensor.nonzero,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.__float__,
}
