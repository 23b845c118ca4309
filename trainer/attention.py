"""Attention for packed sequences without flash-attn: each packed sample attends within itself,
computed sample by sample instead of as one masked product over the whole row.

Given restarting position ids, transformers' SDPA path builds a block-diagonal mask and still
computes every pair of the packed row: for an 8192-token pack of ~600-token samples, 13 times
the pairs that matter, and on a small model most of the step (benchmarks/train.py measured packing
at 0.18x the useful tokens/s of padded batches that way, 1.8x with attention per sample).
flash_attention_2 has varlen kernels for this; where it is not installed the trainer registers
"mmloom_packed" with transformers' AttentionInterface: causal self-attention cut at the position
restarts, one SDPA call per sample. Everything else goes to SDPA unchanged: vision towers (no
position ids), cross-attention (keys of another length), bidirectional or explicit masks.

No mask is built for this implementation (transformers builds none for names it has no mask
function for), so it only serves models whose causal self-attention needs no mask beyond the
sample boundaries: no sliding windows (see `usable`).
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "mmloom_packed"


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    length = query.shape[2]
    if (position_ids is None or attention_mask is not None or not causal or query.shape[0] != 1
            or key.shape[2] != length or position_ids.shape[-1] != length):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    positions = position_ids.reshape(-1, length)[0]
    # A sample starts wherever the position does not follow the one before (as transformers'
    # find_packed_sequence_indices reads packed rows).
    starts = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten().add(1).tolist()
    bounds = [0, *starts, length]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    # split, not slicing: a slice's backward writes its gradient into a zeroed tensor of the
    # whole row, once per sample; split's backward is one concatenation.
    outputs = [sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)[0]
               for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))]
    return torch.cat(outputs, dim=1), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    return NAME


def usable(config: Any) -> bool:
    """Whether the model's causal self-attention is plain (no sliding window), so sample boundaries
    are the only mask it needs."""
    text = config.get_text_config()
    if any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or []):
        return False
    return not getattr(text, "sliding_window", None) or getattr(text, "use_sliding_window", True) is False
