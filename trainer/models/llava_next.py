"""LLaVA-NeXT (llava-v1.6, AnyRes): each image is a stack of 336-px views, a base view plus the tiles
of its best grid pinpoint, so `pixel_values` is [images, views, 3, 336, 336] with `image_sizes`
[images, 2] (original height, width). The processor pads the view dimension with zero views to the
largest image of its call and the model drops them again (it counts each image's views from
`image_sizes`), so segments and packed samples are concatenated along the image dimension after
padding their view dimension to the largest one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.models.llava import LlavaAdapter
from trainer.models.registry import register


@register
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    example = "llava-hf/llava-v1.6-mistral-7b-hf"
    media_keys = ("pixel_values", "image_sizes")
    # The learned row-end embedding appended to tile features belongs with the projector (trained in
    # stage 1 alongside it), not with the language model.
    group_patterns = (
        ("projector", (*LlavaAdapter.group_patterns[0][1], "image_newline")),
        *LlavaAdapter.group_patterns[1:],
    )

    def collate_media(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Concatenate images of segments or packed samples, zero-padding the view dimension as the
        processor does for images of one call."""
        pixels = [p["pixel_values"] for p in parts if "pixel_values" in p]
        if not pixels:
            return super().collate_media(parts)
        views = max(x.shape[1] for x in pixels)
        padded = [F.pad(x, (0, 0, 0, 0, 0, 0, 0, views - x.shape[1])) for x in pixels]
        return {
            "image_sizes": torch.cat([p["image_sizes"] for p in parts if "pixel_values" in p]),
            "pixel_values": torch.cat(padded),
        }
