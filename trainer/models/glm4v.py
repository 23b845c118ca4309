"""GLM-4.1V (GLM-4.1V-9B-Thinking): Qwen2-VL's media tensors and [4, L] packed positions, GLM's chat format.

What GLM shares with Qwen2-VL, checked against transformers' modeling_glm4v: patch-flattened
`pixel_values` with `image_grid_thw` (14-px patches, 2-frame temporal patches, 2x2 merge), videos as
`pixel_values_videos` with `video_grid_thw`, a text model that reads packed positions as [4, L] (row 0
text positions restarting per sample, from which it builds the block-diagonal mask; rows 1-3 the
temporal/height/width rope indices), and a rope index the model computes itself (`get_rope_index`, run
here on a stand-in, as for Qwen2-VL).

What differs:
- Video frames are image tokens. The processor writes a video as <|begin_of_video|>, then per temporal
  patch <|begin_of_image|><|image|>...<|end_of_image|> followed by its time in whole seconds (the first
  frame of the pair, from the metadata of the frames data_tools.video sampled), then <|end_of_video|>.
  So video tokens are told from image tokens by the video span around them (as the processor's
  `mm_token_type_ids`), and the rope index gives each temporal patch its own grid: time advances through
  the timestamp text, not through rope steps. The video processor needs 2 frames: a one-frame clip is
  that frame twice, as GLM's own frame sampler makes every frame count even.
- The model places image features at every <|image|> token, the video frames' included (and video
  features likewise), so a sequence holding both fails its feature-count check (transformers 5.25).
  `model_inputs` hands videos to the model as images instead, each temporal patch one image grid, in the
  order their tokens appear: the vision tower encodes a video exactly so (get_video_features splits its
  grid per temporal patch), and one vision call per forward keeps FSDP's collectives the same on every
  rank, whatever a pack holds.
- The chat format has no end-of-turn token: "[gMASK]<sop><|system|>\\n...<|user|>\\n...<|assistant|>\\n..."
  and the model ends its turn by generating <|user|> (or <|observation|>, <|endoftext|>: the published
  configs' eos_token_id). mmloom renders conversations with the checkpoint's template plus
  three changes, applied in `training_template` to whatever template the checkpoint ships (the checkpoint
  and what export saves keep theirs):
  1. A conversation ending with an answer ends with <|user|>, the token the model stops with, so every
     answer, the last included, is trained up to its end-of-turn token (ms-swift's GLM templates end the
     last answer with <|user|> too). Inference prompts never end with an answer and are unchanged.
  2. Typed content is written as text before the template sees it: GLM-4.1V's template writes a system
     or assistant message's content as it is, so a list of parts (what mmloom's renderer passes) would
     become its Python repr; images inside an answer become image blocks.
  3. GLM-4.5V's template drops the reasoning (<think>...</think>) of answers before the last user
     message. Rendering turn a alone then shows its reasoning and the whole conversation does not, so
     earlier answers could not be cut out of the whole (render.py needs prefix-consistent rendering);
     every answer keeps its reasoning instead (LLaMA-Factory's default for multi-turn reasoning data).
     Conversations without reasoning render as the published template renders them.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import torch

from trainer.models.adapter import VideoFrames
from trainer.models.qwen2_vl import Qwen2VLAdapter
from trainer.models.registry import register

# Change 2: messages with typed content become messages with text content, media written as the GLM
# templates write them. A top-level `set` replaces the template's `messages` for what follows.
TEXT_CONTENT = (
    "{%- set mmloom = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string or m['content'] is none -%}"
    "{%- set mmloom.messages = mmloom.messages + [m] -%}"
    "{%- else -%}{%- set text = namespace(s='') -%}"
    "{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'video' or 'video' in part -%}"
    "{%- set text.s = text.s + '<|begin_of_video|><|video|><|end_of_video|>' -%}"
    "{%- elif part['type'] == 'image' or 'image' in part -%}"
    "{%- set text.s = text.s + '<|begin_of_image|><|image|><|end_of_image|>' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.s = text.s + part['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set mmloom.messages = mmloom.messages + [dict(m, content=text.s)] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = mmloom.messages -%}"
)
# Change 1: the end-of-turn token after a final answer.
END_OF_TURN = (
    "{%- if not add_generation_prompt and messages and messages[-1]['role'] == 'assistant' -%}"
    "<|user|>"
    "{%- endif -%}"
)
# Change 3: GLM-4.5V's condition for keeping an answer's reasoning, and what it becomes.
EARLIER_REASONING = "loop.index0 > ns.last_user_index and reasoning_content"


def training_template(template: str) -> str:
    """The chat template mmloom renders with, from the checkpoint's (see the module docstring)."""
    return TEXT_CONTENT + template.replace(EARLIER_REASONING, "reasoning_content") + END_OF_TURN


@register
class Glm4vAdapter(Qwen2VLAdapter):
    family = "glm4v"
    model_types = ("glm4v",)
    example = "zai-org/GLM-4.1V-9B-Thinking"
    end_of_turn_tokens = ("<|user|>", "<|observation|>")
    media_token_pattern = r"<\|(begin|end)_of_(image|video)\|>"

    @cached_property
    def processor(self) -> Any:
        """The checkpoint's processor, rendering conversations with `training_template` (its
        chat_template attribute, which export saves, stays the checkpoint's)."""
        proc = super().processor
        if isinstance(proc.chat_template, str):
            render, template = proc.apply_chat_template, training_template(proc.chat_template)

            def apply_chat_template(
                conversation: Any, chat_template: str | None = None, **kwargs: Any
            ) -> Any:
                return render(
                    conversation, chat_template=template if chat_template is None else chat_template, **kwargs
                )

            proc.apply_chat_template = apply_chat_template
        return proc

    def _model_class(self) -> Any:
        from transformers.models.glm4v.modeling_glm4v import Glm4vModel

        return Glm4vModel

    def token_kinds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """0 for text, 1 for image tokens, 2 for image tokens inside a video span (the processor's
        mm_token_type_ids)."""
        config = self.config
        image = input_ids == config.image_token_id
        starts = torch.cumsum(input_ids == config.video_start_token_id, dim=-1)
        video = starts > torch.cumsum(input_ids == config.video_end_token_id, dim=-1)
        kinds = torch.zeros_like(input_ids, dtype=torch.int32)
        kinds[image] = 1
        kinds[image & video] = 2
        return kinds

    def position_ids(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor:
        text = torch.arange(input_ids.shape[0], dtype=torch.int64)
        if "image_grid_thw" not in media and "video_grid_thw" not in media:
            return text.expand(4, -1).clone()
        kinds = self.token_kinds(input_ids)
        rope, _ = self._rope(input_ids[None], kinds[None], **self._rope_kwargs(media))
        return torch.cat([text[None], rope[:, 0]], dim=0)

    def videos_as_images(
        self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The videos of a packed sequence as images: each temporal patch an image grid (1, h, w), images
        and patches interleaved in the order their tokens appear. The tokens stay: they are image tokens."""
        if "pixel_values_videos" not in media:
            return input_ids, media
        media = dict(media)
        videos = media.pop("video_grid_thw")
        frames = torch.repeat_interleave(videos, videos[:, 0], dim=0)
        frames[:, 0] = 1
        grids = {1: media.pop("image_grid_thw", torch.zeros(0, 3, dtype=torch.int64)), 2: frames}
        patches = {1: media.pop("pixel_values", None), 2: media.pop("pixel_values_videos")}
        chunks = {
            k: torch.split(patches[k], grids[k].prod(-1).tolist()) if len(grids[k]) else () for k in grids
        }
        merge = self.config.vision_config.spatial_merge_size**2
        kinds = self.token_kinds(input_ids)[input_ids == self.config.image_token_id].tolist()
        order, taken, pos = [], {1: 0, 2: 0}, 0
        while pos < len(kinds):  # each image or temporal patch: a run of its grid's merged-patch count
            kind = kinds[pos]
            order.append((kind, taken[kind]))
            pos += int(grids[kind][taken[kind]].prod()) // merge
            taken[kind] += 1
        assert taken == {k: len(g) for k, g in grids.items()}, "media tokens do not match the grids"
        media["pixel_values"] = torch.cat([chunks[k][i] for k, i in order])
        media["image_grid_thw"] = torch.stack([grids[k][i] for k, i in order])
        return input_ids, media

    def video_input(self, clip: Any) -> VideoFrames:
        video = VideoFrames.of(clip)
        if len(video.frames) == 1:
            video.frames = np.concatenate([video.frames, video.frames])
            video.metadata["frames_indices"] *= 2
        return video
