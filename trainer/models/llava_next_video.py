"""LLaVA-NeXT-Video: LLaVA-NeXT's image path (AnyRes 336-px views, `pixel_values` [images, views, 3,
336, 336] with `image_sizes`, views zero-padded when segments or packed samples are concatenated) on
a Vicuna decoder with vicuna_v1 turns ("USER: ... ASSISTANT: ...</s>"). Videos are native: 336-px
frames (`pixel_values_videos` [videos, frames, 3, 336, 336]) whose CLIP features are average-pooled
2x2 to 144 tokens a frame, the frames data_tools.video sampled and no others.

Videos of different frame counts cannot share the frame dimension. Each frame is encoded and pooled
on its own and nothing marks where a video ends, so the frames of all videos in one row,
[1, all frames, ...], give the model the same features in the same order: `collate_media` keeps the
processor's [videos, frames] while the frame counts agree and makes that one row when they differ.

Images and videos go through two calls of the vision tower: its blocks stay in the root FSDP unit
(fsdp_root_block), so a rank whose pack holds both issues the same collectives as one whose pack
holds only one kind.
"""

from __future__ import annotations

import torch

from trainer.models.llava_next import LlavaNextAdapter
from trainer.models.registry import register


def split_videos(
    parts: list[dict[str, torch.Tensor]],
) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """Media of segments or packed samples: each part's image tensors (parts without any left out),
    and the parts' `pixel_values_videos`, in order."""
    images = [{k: v for k, v in p.items() if k != "pixel_values_videos"} for p in parts]
    return [p for p in images if p], [p["pixel_values_videos"] for p in parts if "pixel_values_videos" in p]


def videos_in_one_row(videos: list[torch.Tensor]) -> torch.Tensor:
    """[videos, frames, ...] tensors of segments or packed samples, concatenated: on the video dimension
    while all have the same frame count, else every frame in one row."""
    if len({v.shape[1] for v in videos}) == 1:
        return torch.cat(videos)
    return torch.cat([v.flatten(0, 1) for v in videos])[None]


@register
class LlavaNextVideoAdapter(LlavaNextAdapter):
    family = "llava_next_video"
    model_types = ("llava_next_video",)
    example = "llava-hf/LLaVA-NeXT-Video-7B-hf"
    media_keys = ("pixel_values", "image_sizes", "pixel_values_videos")
    video = "native"

    def collate_media(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        images, videos = split_videos(parts)
        media = super().collate_media(images)
        if videos:
            media["pixel_values_videos"] = videos_in_one_row(videos)
        return media

    def fsdp_root_block(self, name: str) -> bool:
        return self.param_group(name + ".") == "vision"
