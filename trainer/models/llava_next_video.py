"""LLaVA-NeXT-Video: LLaVA-NeXT's image path (AnyRes 336-px views, `pixel_values` [images, views, 3,
336, 336] with `image_sizes`, views zero-padded when segments or packed samples are concatenated) on
a Vicuna decoder with vicuna_v1 turns ("USER: ... ASSISTANT: ...</s>"). Videos are 336-px frames
whose CLIP features are average-pooled 2x2 to 144 tokens a frame (a later issue: images only now).
"""

from __future__ import annotations

from trainer.models.adapter import register
from trainer.models.llava_next import LlavaNextAdapter


@register
class LlavaNextVideoAdapter(LlavaNextAdapter):
    family = "llava_next_video"
    model_types = ("llava_next_video",)
    example = "llava-hf/LLaVA-NeXT-Video-7B-hf"
    video = ""  # videos are a later issue; the tiny processor already has the real video settings
