"""Gemma 3: SigLIP at 896 px pooled to 256 tokens per image, Gemma turns, and image tokens that attend
to each other both ways (the rest of the sequence is causal).

transformers builds that mask from `token_type_ids` (1 on <image_soft_token>), but in 5.23-5.25 not
correctly for a packed sequence (a strict xfail in tests/families/test_gemma3.py fails once a release
fixes it): in the sliding-window layers the bidirectional image overlay is looked up at the
per-sample positions instead of the packed indices (masking_utils remaps q/kv indices through the
restarting position ids before the overlay sees them), so every packed sample after the first gets
the wrong image blocks. The adapter therefore hands the model its masks ready-made, one per layer
type, as `attention_mask={"full_attention": ..., "sliding_attention": ...}` (the form `generate`
uses, which the model takes as is): each packed sample is a causal sequence of its own, each run of
image tokens is a bidirectional block inside it, and the sliding layers keep the last
`sliding_window` positions. Collate gives only each token's sample and image-block ids
(`mmloom_mask`, [2, L]); the adapter's hook builds the masks from them on the device, once per
forward (trainer/attention.py's `block_causal`): flex_attention BlockMasks on CUDA, whose kernel skips
the tiles no token of which attends (most of a pack of several samples), and dense boolean masks for
SDPA elsewhere ([1, 1, L, L], 64 MiB per layer type at 8192 tokens). Flash-attention and varlen
kernels cannot express the image blocks.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.attention import block_causal
from trainer.models.adapter import ModelAdapter
from trainer.models.registry import register


def image_blocks(is_image: torch.Tensor) -> torch.Tensor:
    """Block id per token: each run of image tokens gets its own id, other tokens -1 (as transformers'
    `get_block_sequence_ids_for_mask` numbers them)."""
    starts = is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])
    return torch.where(is_image, starts.cumsum(0) - 1, -1)


@register
class Gemma3Adapter(ModelAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    example = "google/gemma-3-4b-it"
    media_keys = ("pixel_values",)
    end_of_turn_tokens = ("<end_of_turn>",)
    # The processor names <start_of_image> only; the soft tokens and <end_of_image> are media too.
    media_token_pattern = r"<image_soft_token>|<end_of_image>"

    def model_inputs(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        media: dict[str, torch.Tensor],
    ) -> dict[str, Any]:
        blocks = image_blocks(input_ids == self.config.image_token_id)
        return {
            "input_ids": input_ids[None],
            "labels": labels[None],
            "position_ids": position_ids[None],
            "mmloom_mask": mask_ids(position_ids, blocks),
            **media,
        }

    def attention_masks(self, ids: torch.Tensor, backend: str) -> dict[str, Any]:
        """One mask per layer type: the sliding layers keep the last `sliding_window` positions."""
        text = self.config.get_text_config()
        return {
            kind: block_causal(ids, text.sliding_window if kind == "sliding_attention" else None, backend)
            for kind in sorted(set(text.layer_types))
        }


def mask_ids(position_ids: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[2, L] int32 ids for `block_causal`: a sample starts wherever the positions do not go up by one
    (as transformers' `find_packed_sequence_indices` reads them); `blocks` as `image_blocks` numbers them."""
    sample = (torch.diff(position_ids, prepend=position_ids[:1] - 1) != 1).cumsum(0)
    return torch.stack([sample, blocks]).to(torch.int32)
