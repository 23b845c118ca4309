"""Qwen2.5-VL: Qwen2-VL's media tensors, ChatML turns and 3-D rope, plus absolute time for video.

The rope indices come from the model's own `get_rope_index` (modeling_qwen2_5_vl), which spaces a
video's temporal positions by `second_per_grid_ts * tokens_per_second`; the processor's
`second_per_grid_ts` (one value per video: temporal patch size / sampled fps, from the metadata of
the frames data_tools.video really sampled) therefore travels with the media tensors and is
concatenated across packed samples like the grids. The vision tower's window attention works
within each image's own patch grid, so concatenating the images of packed samples changes nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.models.qwen2_vl import Qwen2VLAdapter
from trainer.models.registry import register


@register
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    example = "Qwen/Qwen2.5-VL-7B-Instruct"
    media_keys = (
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
    )

    def _model_class(self) -> Any:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

        return Qwen2_5_VLModel

    def _rope_kwargs(self, media: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {**super()._rope_kwargs(media), "second_per_grid_ts": media.get("second_per_grid_ts")}
