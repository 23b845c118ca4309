"""Mistral Small 3.1 (mistral3): a Pixtral vision tower at native resolution, so images of one
batch have different sizes. The processor pads them with zeros, bottom and right, to the largest
height and width of its call: `pixel_values` is [images, 3, H, W] with `image_sizes` [images, 2]
(each image's own height, width), and the tower cuts each image back to its size before attending
within it alone (a block-diagonal mask over the images' patches). Segments and packed samples are
therefore concatenated along the image dimension after padding to the largest height and width,
as one processor call would have done.

Turns end with </s> (the tokenizer's EOS); [IMG_BREAK] / [IMG_END] close each row of image tokens
(the processor names them, so they are media tokens, never labels).
The text model is a Mistral decoder with 1-D rope, so the generic restarting positions hold. A sample
without a system prompt gets the template's default one, which carries the date it is rendered on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.models.adapter import ModelAdapter
from trainer.models.registry import register


@register
class Mistral3Adapter(ModelAdapter):
    family = "mistral3"
    model_types = ("mistral3",)
    example = "mistralai/Mistral-Small-3.1-24B-Instruct-2503"
    media_keys = ("pixel_values", "image_sizes")

    def collate_media(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Concatenate images of segments or packed samples, zero-padding height and width to the
        largest, as the processor pads the images of one call."""
        pixels = [p["pixel_values"] for p in parts if "pixel_values" in p]
        if not pixels:
            return super().collate_media(parts)
        height, width = max(x.shape[-2] for x in pixels), max(x.shape[-1] for x in pixels)
        padded = [F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2])) for x in pixels]
        return {
            "image_sizes": torch.cat([p["image_sizes"] for p in parts if "pixel_values" in p]),
            "pixel_values": torch.cat(padded),
        }
