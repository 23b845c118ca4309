"""LLaVA-OneVision (and the LLaVA-NeXT-Interleave checkpoints of the same class): SigLIP-384 views,
a Qwen2 decoder, ChatML turns.

How an image is shown depends on the other images of its sample, as in the original training code and
in the processor at inference: an image alone gets AnyRes-max-9 (a base view plus up to 36 tiles,
`pixel_values` [1, views, 3, 384, 384]); the images of a multi-image sample get their base view only
(padded square, [images, 1, 3, 384, 384]) and one newline token each. The processor picks the mode
from the images of one sample in one call, and the model from `batch_num_images` (images per sample).
Segments are rendered one at a time, so `process` is told how many images the whole sample has, and
`batch_num_images` is made per sample: a segment holding only part of a multi-image sample leaves it
out and `collate_media` counts the sample's images; packed samples concatenate theirs. The view
dimension is zero-padded as for LLaVA-NeXT.

The per-turn prompts of a conversation whose images sit in different turns cannot all match inference:
with one image so far the processor shows it with tiles, once a second one follows both lose them.
mmloom renders the whole sample as inference renders the whole conversation.

Videos are native: 384-px frames (`pixel_values_videos` [videos, frames, 3, 384, 384]), the frames
data_tools.video sampled, each pooled 2x2 to 14x14 = 196 tokens, and one newline per video. The model
reads one video per row of that tensor and appends the newline to each row, so videos of different
frame counts can share neither a row nor the tensor: the packer keeps them in different micro-batches
(packs_with). Images and videos go through two calls of the vision tower: its blocks stay in the root
FSDP unit (fsdp_root_block), so ranks whose packs hold different media issue the same collectives.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.models.llava_next import LlavaNextAdapter
from trainer.models.llava_next_video import split_videos
from trainer.models.registry import register


@register
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    example = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    media_keys = ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos")
    end_of_turn_tokens = ("<|im_end|>",)
    video = "native"

    def process(self, text: str, images: list, videos: list, first: bool, sample_images: int = 0) -> Any:
        if len(images) == 1 and sample_images > 1:
            # One image of a multi-image sample: the processor shows an image without tiles only beside
            # another, so process it beside a copy of itself placed at the very end, and cut the copy off.
            out = super().process(text + self.image_token, [images * 2], videos, first)
            ids = out["input_ids"]
            copy = int((ids == self.processor.image_token_id).sum()) // 2
            for key in ("input_ids", "attention_mask"):
                out[key] = out[key][:, :-copy]
            out["pixel_values"], out["image_sizes"] = out["pixel_values"][:1], out["image_sizes"][:1]
        else:
            # One list per sample: the processor's multi-image mode for several images, as at inference.
            out = super().process(text, [images] if images else [], videos, first)
        if images and len(images) < sample_images:
            del out["batch_num_images"]  # part of a sample: collate_media counts the whole sample
        return out

    def collate_media(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        images, videos = split_videos(parts)
        media = super().collate_media(images)
        if "pixel_values" in media:
            counts = [p["batch_num_images"] for p in parts if "batch_num_images" in p]
            # Parts without a count are segments of one multi-image sample; all others are whole samples.
            media["batch_num_images"] = (
                torch.cat(counts) if counts else torch.tensor([len(media["image_sizes"])])
            )
        if videos:
            if len({v.shape[1] for v in videos}) > 1:
                raise ValueError(
                    f"LLaVA-OneVision cannot batch videos of different frame counts "
                    f"({sorted({v.shape[1] for v in videos})}): the packer keeps them apart"
                )
            media["pixel_values_videos"] = torch.cat(videos)
        return media

    def packs_with(self, pack: list[Any], sample: Any) -> bool:
        frames = {
            int(r.media["pixel_values_videos"].shape[1])
            for r in (*pack, sample)
            if "pixel_values_videos" in r.media
        }
        return super().packs_with(pack, sample) and len(frames) <= 1

    def fsdp_root_block(self, name: str) -> bool:
        return self.param_group(name + ".") == "vision"
