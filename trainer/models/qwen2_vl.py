"""Qwen2-VL: 3-D multimodal rope, patch-flattened pixel tensors with their grids, ChatML turns.

Packed sequences carry position ids of shape [4, L]: the first row holds 1-D text positions that
restart at 0 for each sample (transformers builds the block-diagonal mask from them), the other
three the sample's own temporal/height/width rope indices, computed by the model's own
`get_rope_index` so training and inference agree.

Videos are native: the frames data_tools.video sampled go to the processor with their metadata and
are not sampled again; 2 frames make a temporal patch, `video_grid_thw` [videos, 3] and the patch-flattened
`pixel_values_videos` are concatenated across segments and packed samples like the images'. The model
encodes images and videos in two calls of its vision tower, an FSDP unit per block: two calls in one
rank's forward and one in another's would have the ranks issue different collectives. The tower treats
a video grid (t, h, w) exactly as it treats t frames of an image grid (attention, windows and position
embeddings never cross a frame), so `model_inputs` hands the videos to the model as images, in sequence
order with their tokens relabelled: one vision call per forward, whatever the pack holds, same features.
"""

from __future__ import annotations

import types
from functools import cached_property
from typing import Any

import torch

from trainer.models.adapter import ModelAdapter
from trainer.models.registry import register


@register
class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    example = "Qwen/Qwen2-VL-7B-Instruct"
    media_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    end_of_turn_tokens = ("<|im_end|>",)
    media_token_pattern = r"<\|vision_(start|end)\|>"
    video = "native"

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

    def model_inputs(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        media: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        input_ids, media = self.videos_as_images(input_ids, media)
        return {
            "input_ids": input_ids[None],
            "labels": labels[None],
            "position_ids": position_ids[:, None],
            **media,
        }

    def videos_as_images(
        self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The videos of a packed sequence as images for the model's single image path: patches and grids
        of images and videos interleaved in the order their tokens appear, video tokens relabelled as
        image tokens. Positions are given (computed with the videos' own grids and times), so nothing
        else reads the video inputs."""
        media = {k: v for k, v in media.items() if k != "second_per_grid_ts"}  # read by the rope index only
        if "pixel_values_videos" not in media:
            return input_ids, media
        image_id, video_id = self.config.image_token_id, self.config.video_token_id
        merge = self.config.vision_config.spatial_merge_size**2
        grids = {
            image_id: media.pop("image_grid_thw", torch.zeros(0, 3, dtype=torch.int64)),
            video_id: media.pop("video_grid_thw"),
        }
        patches = {image_id: media.pop("pixel_values", None), video_id: media.pop("pixel_values_videos")}
        chunks = {
            k: torch.split(patches[k], grids[k].prod(-1).tolist()) if len(grids[k]) else () for k in grids
        }
        tokens = input_ids[(input_ids == image_id) | (input_ids == video_id)].tolist()
        order, taken, pos = [], {image_id: 0, video_id: 0}, 0
        while pos < len(tokens):  # each image or video: a run of its grid's merged-patch count
            kind = tokens[pos]
            order.append((kind, taken[kind]))
            pos += int(grids[kind][taken[kind]].prod()) // merge
            taken[kind] += 1
        assert taken == {k: len(g) for k, g in grids.items()}, "media tokens do not match the grids"
        media["pixel_values"] = torch.cat([chunks[k][i] for k, i in order])
        media["image_grid_thw"] = torch.stack([grids[k][i] for k, i in order])
        return torch.where(input_ids == video_id, image_id, input_ids), media
