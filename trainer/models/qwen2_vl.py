"""Qwen2-VL: 3-D multimodal rope, patch-flattened pixel tensors with their grids, ChatML turns.

Packed sequences carry position ids of shape [4, L]: the first row holds 1-D text positions that
restart at 0 for each sample (transformers builds the block-diagonal mask from them), the other
three the sample's own temporal/height/width rope indices, computed by the model's own
`get_rope_index` so training and inference agree.
"""

from __future__ import annotations

import types
from functools import cached_property
from typing import Any

import torch

from trainer.models.adapter import ModelAdapter, register


@register
class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    example = "Qwen/Qwen2-VL-7B-Instruct"
    media_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    end_of_turn_tokens = ("<|im_end|>",)
    media_token_pattern = r"<\|vision_(start|end)\|>"
    rope_dims = 4

    def _model_class(self) -> Any:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

        return Qwen2VLModel

    def _rope_kwargs(self, media: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"image_grid_thw": media.get("image_grid_thw"), "video_grid_thw": media.get("video_grid_thw")}

    @cached_property
    def _rope(self) -> Any:
        # The model's rope-index code needs only the config: run it on a stand-in, no weights.
        model_class = self._model_class()
        stub = types.SimpleNamespace(config=self.config)
        stub.get_vision_position_ids = types.MethodType(model_class.get_vision_position_ids, stub)
        return types.MethodType(model_class.get_rope_index, stub)

    def position_ids(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor:
        text = torch.arange(input_ids.shape[0], dtype=torch.int64)
        if "image_grid_thw" not in media and "video_grid_thw" not in media:
            return text.expand(4, -1).clone()
        kinds = torch.zeros_like(input_ids, dtype=torch.int32)
        kinds[input_ids == self.config.image_token_id] = 1
        kinds[input_ids == self.config.video_token_id] = 2
        rope, _ = self._rope(input_ids[None], kinds[None], **self._rope_kwargs(media))
        return torch.cat([text[None], rope[:, 0]], dim=0)

    def model_inputs(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                     media: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[:, None],
                **media}
