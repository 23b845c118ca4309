"""Linear-attention layers over packed rows: every packed sample starts from a zero state.

A hybrid model's linear-attention layer (Qwen3.5's Gated DeltaNet: a causal depthwise convolution over
the sequence, then the gated delta rule, a recurrence whose state sums up every earlier token) carries
state from token to token whatever the attention mask says. In a packed row the restarting positions
and the per-sample masks keep the full-attention layers apart; nothing resets the convolution window
or the recurrent state, so each sample would read the samples packed before it. transformers 5.25
hands the pack's `cu_seq_lens_q` only to flash-linear-attention's kernel, its torch fallback refuses a
packed row (ValueError), and the convolution runs over the whole row either way.

`apply_per_sample(model, is_layer)` makes each such layer run once per packed sample, on that sample's
slice of the row, and concatenate the outputs: the convolution pads each sample with zeros and the
recurrence starts from a zero state, as for the sample alone. The boundaries are collate's
(trainer/data/packing.py: `mmloom_segments`, else `cu_seq_lens_q`), which reach the layer with the
model's other keyword arguments; the layer never sees them itself (the fallback would refuse them). It
is the same computation as the model on each sample alone, on every device and with every kernel the
layer picks (flash-linear-attention's included: it gets one sample per call), and it takes nothing but
the boundaries: activation checkpointing recomputes it, FSDP2 gathers the parameters once per decoder
layer as before, LoRA on the layer's projections sees each slice. A Python loop over the pack's samples
per layer is slower than one varlen kernel call (flash-linear-attention's `cu_seqlens` plus
causal-conv1d's `seq_idx`), which mmloom does not use yet.

    apply_per_sample(model, lambda m: type(m).__name__.endswith("GatedDeltaNet"))
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class PerSample(nn.Module):
    """Mixin placed before a linear-attention layer's class: its forward runs once per packed sample.
    The layer's forward takes `hidden_states` [batch, tokens, width] first, the cache as `cache` (or
    `cache_params`), an optional 2-D padding `attention_mask` [batch, tokens], and returns
    [batch, tokens, width]."""

    @torch.compiler.disable  # a Python loop over the pack's samples: compiled, it would recompile per make-up
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sizes = packed_sizes(kwargs)  # removes the boundaries from kwargs
        if sizes is None or len(sizes) == 1:
            return super().forward(hidden_states, *args, **kwargs)
        cache = kwargs.get("cache", kwargs.get("cache_params"))
        if args or cache is not None or hidden_states.shape[0] != 1 or sum(sizes) != hidden_states.shape[1]:
            raise ValueError(
                f"{type(self).__name__} got packed-sequence boundaries {list(sizes)} with a cache or inputs "
                f"of shape {tuple(hidden_states.shape)}: a pack is one row of {sum(sizes)} tokens, run with "
                f"use_cache=False"
            )
        mask = kwargs.pop("attention_mask", None)
        masks = mask.split(sizes, dim=1) if mask is not None else [None] * len(sizes)
        layer = super().forward
        # split, not slicing: its backward is one concatenation, not a zeroed row per sample.
        outputs = [
            layer(piece, attention_mask=m, **kwargs)
            for piece, m in zip(hidden_states.split(sizes, dim=1), masks)
        ]
        return torch.cat(outputs, dim=1)


def packed_sizes(kwargs: dict[str, Any]) -> list[int] | None:
    """The sample lengths of a packed row from collate's keyword arguments, which it removes from
    `kwargs`; None when the call carries no boundaries (one sample, as at inference)."""
    from trainer.data.packing import PACKED_KWARGS

    found = {name: kwargs.pop(name) for name in PACKED_KWARGS if name in kwargs}
    if found.get("mmloom_segments"):
        return list(found["mmloom_segments"])
    cu = found.get("cu_seq_lens_q")
    # A compiled block is not handed the Python lengths (trainer/parallel.py): read the boundaries.
    return cu.diff().tolist() if cu is not None else None


@functools.cache
def _per_sample_class(base: type) -> type:
    return type(f"PerSample{base.__name__}", (PerSample, base), {"__module__": __name__})


def apply_per_sample(model: nn.Module, is_layer: Callable[[nn.Module], bool]) -> int:
    """Make every module of `model` for which `is_layer` holds run once per packed sample (the module
    docstring); returns how many. Idempotent: a module already made so is left as it is."""
    count = 0
    for module in model.modules():
        if isinstance(module, PerSample):
            count += 1
        elif is_layer(module):
            module.__class__ = _per_sample_class(type(module))
            count += 1
    return count
