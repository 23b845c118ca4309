"""Llama 4 (Scout, Maverick): a mixture-of-experts language model with early-fused image tiles.

Images. The processor fits each image into the best grid of at most 16 336-px tiles (no distortion,
padded) and, when there are several, adds a 336-px global view. Each tile is 24 x 24 patches of 14 px,
pixel-shuffled 2 x 2 into 144 `<|patch|>` tokens (the model's image token): "<|image_start|>", the tiles
row by row (`<|tile_x_separator|>` between tiles of a row, `<|tile_y_separator|>` after each row), then
"<|image|>" and the global view's 144 tokens, "<|image_end|>". `pixel_values` is [tiles, 3, 336, 336],
concatenated over images as the generic adapter does. The image processor normalises in bf16 (as Meta's
preprocessing does) and the model does not cast its input, so an fp32 model refuses the processor's
output; the adapter hands the model float32 pixels, which hold every bf16 value exactly (FSDP's
mixed-precision policy or autocast take them down to the compute dtype again).

The language model. Three of every four layers use rope and attend within 8192-token chunks
(`chunked_attention`); every fourth is a NoPE layer with full attention whose queries are scaled by
1 + attn_scale * log(1 + floor((position + 1) / floor_scale)) ("temperature tuning"). Every layer of
Scout is a mixture of 16 experts (top-1, sigmoid gate) plus a shared expert; the experts are 3-D
parameters of their decoder layer.

Packing. Positions restart per sample, so rope does. Attention must also restart its chunks per sample:
collate hands the model each token's sample and chunk-of-its-sample ids (`mmloom_mask`), and once per
forward the adapter's hook builds the masks of both layer types (trainer/attention.py's `block_causal`;
`attention_mask={"full_attention": ..., "chunked_attention": ...}`, the form `generate` uses, which the
model takes as is): flex_attention BlockMasks on CUDA, dense boolean masks for SDPA elsewhere. The
temperature tuning cannot be handed per-sample positions: transformers counts them from the start of
the row (`torch.arange(seq_len)` in Llama4TextAttention), so a token of a later sample would be scaled
as if it sat that far into its own sample. The scale is 1 until position floor_scale - 1 (8191), so the
adapter packs several samples only into rows shorter than floor_scale; a longer sample packs alone.
Chunked attention is attention, not a state carried from token to token (attention.py's `packing_leaks`
only knows full and sliding layers), so packing stays on.

Configs written by transformers 4.51, as the published ones were, hold `"attn_temperature_tuning": 4`,
which transformers 5's strict Llama4TextConfig refuses (it wants a bool): the adapter says so up front,
with the one-word fix, instead of a validation error from inside AutoConfig.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from trainer.attention import block_causal
from trainer.models.adapter import ModelAdapter
from trainer.models.registry import register


@register
class Llama4Adapter(ModelAdapter):
    family = "llama4"
    model_types = ("llama4",)
    example = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
    media_keys = ("pixel_values",)
    end_of_turn_tokens = ("<|eot|>",)

    def __init__(self, path: str | Path, trust_remote_code: bool = False) -> None:
        super().__init__(path, trust_remote_code)
        check_temperature_tuning(Path(path) / "config.json")

    # --- rendering -----------------------------------------------------------------------------------

    def media_of(self, out: Any) -> dict[str, torch.Tensor]:
        """The processor's pixels (bf16) as float32: the same values, in a dtype any model takes."""
        media = super().media_of(out)
        if "pixel_values" in media:
            media["pixel_values"] = media["pixel_values"].float()
        return media

    # --- batching ------------------------------------------------------------------------------------

    @cached_property
    def packs_isolated(self) -> bool:
        """Full and chunked attention layers, experts routed token by token: nothing carries one
        sample's state into the next once the masks below keep them apart."""
        return True

    def packs_with(self, pack: list[Any], sample: Any) -> bool:
        """Several samples share a row only while the row is shorter than floor_scale, where the
        temperature tuning transformers counts from the row's start is still 1 (module docstring)."""
        text = self.config.get_text_config()
        if not pack or not text.attn_temperature_tuning:
            return super().packs_with(pack, sample)
        short = sum(s.length for s in pack) + sample.length < text.floor_scale
        return short and super().packs_with(pack, sample)

    def model_inputs(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        media: dict[str, torch.Tensor],
    ) -> dict[str, Any]:
        return {
            "input_ids": input_ids[None],
            "labels": labels[None],
            "position_ids": position_ids[None],
            "mmloom_mask": chunk_ids(position_ids, self.config.get_text_config().attention_chunk_size),
            **media,
        }

    def attention_masks(self, ids: torch.Tensor, backend: str) -> dict[str, Any]:
        """One causal mask per layer type of the model: within each sample, or within each chunk of it."""
        unblocked = torch.full_like(ids[0], -1)
        rows = {"full_attention": ids[0], "chunked_attention": ids[1]}
        return {
            kind: block_causal(torch.stack([rows[kind], unblocked]), None, backend)
            for kind in sorted(set(self.config.get_text_config().layer_types))
        }


def chunk_ids(position_ids: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """[2, L] int32: each token's sample (a sample starts wherever the positions do not go up by one, as
    transformers' `find_packed_sequence_indices` reads them) and its chunk of `chunk` positions within
    its sample (the sample itself without chunks)."""
    new_sample = torch.diff(position_ids, prepend=position_ids[:1] - 1) != 1
    sample = new_sample.cumsum(0)
    piece = (new_sample | (position_ids % chunk == 0)).cumsum(0) if chunk else sample
    return torch.stack([sample, piece]).to(torch.int32)


def check_temperature_tuning(config: Path) -> None:
    """Refuse, with what to do, a config.json that transformers 5 cannot load: the published Llama 4
    configs say `"attn_temperature_tuning": 4` (transformers 4.51's integer flag); 5.x wants a bool."""
    if not config.is_file():
        return
    value = (json.loads(config.read_text()).get("text_config") or {}).get("attn_temperature_tuning")
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            f"{config}: text_config.attn_temperature_tuning is {value}, an integer transformers 4.51 wrote "
            f"and transformers 5's Llama4TextConfig refuses (it wants a bool). Set it to "
            f"{'true' if value else 'false'} in config.json: the model reads it as a flag, nothing changes."
        )
