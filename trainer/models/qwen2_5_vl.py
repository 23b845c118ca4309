"""Qwen2.5-VL: Qwen2-VL's media tensors, ChatML turns and 3-D rope, plus absolute time for video.

The rope indices come from the model's own `get_rope_index` (modeling_qwen2_5_vl), which spaces a
video's temporal positions by `second_per_grid_ts * tokens_per_second`; the processor's
`second_per_grid_ts` (one value per video) therefore travels with the media tensors and is
concatenated across packed samples like the grids. The vision tower's window attention works
within each image's own patch grid, so concatenating the images of packed samples changes nothing.
"""

from __future__ import annotations

import types
from functools import cached_property
from typing import Any

import torch

from trainer.models.adapter import register
from trainer.models.qwen2_vl import Qwen2VLAdapter


@register
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    media_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                  "second_per_grid_ts")

    @cached_property
    def _rope(self) -> Any:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

        stub = types.SimpleNamespace(config=self.config)
        stub.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids, stub)
        return types.MethodType(Qwen2_5_VLModel.get_rope_index, stub)

    def position_ids(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor:
        text = torch.arange(input_ids.shape[0], dtype=torch.int64)
        if "image_grid_thw" not in media and "video_grid_thw" not in media:
            return text.expand(4, -1).clone()
        kinds = torch.zeros_like(input_ids, dtype=torch.int32)
        kinds[input_ids == self.config.image_token_id] = 1
        kinds[input_ids == self.config.video_token_id] = 2
        rope, _ = self._rope(input_ids[None], kinds[None], image_grid_thw=media.get("image_grid_thw"),
                             video_grid_thw=media.get("video_grid_thw"),
                             second_per_grid_ts=media.get("second_per_grid_ts"))
        return torch.cat([text[None], rope[:, 0]], dim=0)
