"""Qwen3-VL: Qwen2-VL's media tensors, ChatML turns and [4, L] packed positions, on a Qwen3 text model.

What differs from Qwen2-VL, and why the Qwen2-VL plumbing still holds:
- The rope index comes from the model's own `get_rope_index` (modeling_qwen3_vl), same signature
  and same image positions as Qwen2-VL's. Only videos differ: each frame is its own
  <|vision_start|>...<|vision_end|> block after a "<t seconds>" timestamp, so the model splits
  `video_grid_thw` per frame and time advances through text instead of rope steps.
- The text model reads packed positions as Qwen2-VL's does: row 0 (text positions restarting per
  sample) builds the block-diagonal mask, rows 1-3 feed the rope, which interleaves the T/H/W
  frequencies (mrope_interleaved) instead of giving each axis a contiguous section.
- DeepStack: merged features of intermediate vision blocks are added to the image tokens' hidden
  states in the first decoder layers. The model scatters them by the image-token mask of the whole
  sequence, in image order, so concatenating packed samples' images in order keeps them in place.
  Only `visual.merger` is the projector group; the DeepStack mergers (`visual.deepstack_merger_list`)
  stay with the vision tower, as LLaMA-Factory groups them.
- The published chat template has no default system prompt (see tiny/qwen3_vl.py).
- Videos: the processor writes each temporal patch (2 frames) as "<t seconds>" text plus its own
  vision block, t the mean time of its frames from the video metadata: the real timestamps of the
  frames data_tools.video sampled (adapter.VideoFrames), never the processor's default of 24 fps.
  Its video resize needs 2 frames: a clip of one frame is that frame twice, what Qwen2-VL's processor
  does to fill a temporal patch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainer.models.adapter import VideoFrames
from trainer.models.qwen2_vl import Qwen2VLAdapter
from trainer.models.registry import register


@register
class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    example = "Qwen/Qwen3-VL-8B-Instruct"

    def _model_class(self) -> Any:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        return Qwen3VLModel

    def video_input(self, clip: Any) -> VideoFrames:
        video = VideoFrames.of(clip)
        if len(video.frames) == 1:
            video.frames = np.concatenate([video.frames, video.frames])
            video.metadata["frames_indices"] *= 2
        return video
