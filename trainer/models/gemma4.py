"""Gemma 4 (E2B, E4B, 26B-A4B, 31B): a variable-resolution vision tower, per-layer embeddings and shared
keys and values in the small models, and masks that Gemma 3's adapter cannot give unchanged.

Images keep their aspect ratio: each is resized to the largest multiple of 48 px a side (16-px patches,
3x3 pooling) within 280 * 9 patches, so it costs (height / 48) * (width / 48) <= 280 soft tokens,
written "<|image>" + n * "<|image|>" + "<image|>". The patches are padded to 2520 a picture
(`pixel_values` [images, 2520, 768] with `image_position_ids`, -1 on padding), so segments and packed
samples are concatenated on the image dimension. Videos are native: the sampled frames become 70-token
pictures, each written "mm:ss <|image>" + n * "<|video|>" + "<image|>" after its timestamp
(`pixel_values_videos` [frames, 630, 768], `video_position_ids`, `num_frames_per_video`). The model
encodes images and videos in two calls of its vision tower, so the tower's blocks stay in the root FSDP
unit (fsdp_root_block). The audio tower of E2B/E4B is never fed; it counts as a media encoder.

Masks. Unlike Gemma 3, image tokens attend ahead only where the config says
`use_bidirectional_attention="vision"` (26B-A4B, 31B), and only in the sliding-window layers: there a
run of soft tokens (one image, one video frame) is a bidirectional block within the window, while the
full-attention layers stay causal. E2B/E4B (None) are causal everywhere. transformers builds that
mask from `mm_token_type_ids`, and for a packed row it has Gemma 3's fault (a strict xfail in
tests/families/test_gemma4.py). As for Gemma 3, collate hands the model each token's sample and block
ids (`mmloom_mask`) and the hook builds the masks of both layer types with trainer/attention.py's
`block_causal`: flex_attention BlockMasks on CUDA, dense boolean masks for SDPA elsewhere. The causal
E2B/E4B take that path too: their full-attention heads are 512 wide, more than the flash kernels behind
varlen attention take. `use_bidirectional_attention="all"` (no causal mask at all) is refused.

Nothing else crosses tokens: per-layer embeddings are looked up and projected per token, and the
layers that share keys and values (the last 20 of E2B's 35, 18 of E4B's 42) reuse those an earlier
layer computed for the same tokens, under the same mask; 26B-A4B's experts route each token on its
own. Final logits are soft-capped at 30, which trainer/loss.py applies. 26B-A4B's config names no
router loss coefficient and transformers adds none, so neither does the trainer unless
`train.router_aux_loss_coef` sets one; then trainer/moe.py takes `top_k_experts` and the router's
probabilities, which is what Gemma 4 records instead of logits (`router_outputs`).

Chat template. E2B/E4B's generation prompt is "<|turn>model\n", the turn the history shows before an
answer. 26B-A4B/31B's goes on with an empty, closed thought channel "<|channel>thought\n<channel|>"
(thinking off) that the history never shows, so no prompt is a prefix of the conversation. For those
templates `chat_text` writes that cue after every "<|turn>model\n": each answer is trained right after
exactly the tokens inference ends its prompt with, the first answer's prompt is the inference prompt,
and a later answer's prompt differs from inference only by the cues of the answers before it.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch

from trainer.attention import block_causal
from trainer.models.adapter import ModelAdapter
from trainer.models.gemma3 import image_blocks, mask_ids
from trainer.models.registry import register

MODEL_TURN = "<|turn>model\n"
EMPTY_THOUGHT = "<|channel>thought\n<channel|>"  # 26B-A4B/31B's generation prompt ends with it


@register
class Gemma4Adapter(ModelAdapter):
    family = "gemma4"
    model_types = ("gemma4",)
    example = "google/gemma-4-E2B-it"
    media_keys = (
        "pixel_values",
        "image_position_ids",
        "pixel_values_videos",
        "video_position_ids",
        "num_frames_per_video",
    )
    end_of_turn_tokens = ("<turn|>",)
    video = "native"
    router_outputs = "probabilities"  # 26B-A4B's router records its softmax (no router loss unless set)
    group_patterns = (
        ("projector", ("embed_vision.", "embed_audio.")),
        ("vision", ("vision_tower.", "audio_tower.")),
    )

    @cached_property
    def bidirectional_media(self) -> bool:
        """Whether soft tokens attend both ways within their picture (in the sliding-window layers)."""
        mode = self.config.get_text_config().use_bidirectional_attention
        if mode == "all":
            raise ValueError(
                f"{self.path}: use_bidirectional_attention='all' makes every layer bidirectional; mmloom "
                f"trains causal language models only"
            )
        return mode == "vision"

    def model_inputs(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        media: dict[str, torch.Tensor],
    ) -> dict[str, Any]:
        if self.bidirectional_media:
            soft = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
            blocks = image_blocks(soft)
        else:
            blocks = torch.full_like(input_ids, -1)
        return {
            "input_ids": input_ids[None],
            "labels": labels[None],
            "position_ids": position_ids[None],
            "mmloom_mask": mask_ids(position_ids, blocks),
            **media,
        }

    def attention_masks(self, ids: torch.Tensor, backend: str) -> dict[str, Any]:
        """One mask per layer type: the sliding layers' with picture blocks and the window, the full
        layers' causal."""
        text = self.config.get_text_config()
        causal = torch.stack([ids[0], torch.full_like(ids[1], -1)])
        masks = {}
        for kind in sorted(set(text.layer_types)):
            sliding = kind == "sliding_attention"
            window = text.sliding_window if sliding else None
            masks[kind] = block_causal(ids if sliding else causal, window, backend)
        return masks

    @cached_property
    def thought_cue(self) -> str:
        """EMPTY_THOUGHT where the template's generation prompt ends with it (26B-A4B/31B), else ""."""
        probe = [{"role": "user", "content": "Hi"}]
        history = super().chat_text(probe, add_generation_prompt=False)
        prompt = super().chat_text(probe, add_generation_prompt=True)
        return EMPTY_THOUGHT if prompt == history + MODEL_TURN + EMPTY_THOUGHT else ""

    def chat_text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        text = super().chat_text(messages, add_generation_prompt)
        if not self.thought_cue:
            return text
        # The cue after every model turn, the generation prompt's included (module docstring).
        return text.replace(MODEL_TURN + self.thought_cue, MODEL_TURN).replace(
            MODEL_TURN, MODEL_TURN + self.thought_cue
        )

    def fsdp_root_block(self, name: str) -> bool:
        return ".vision_tower." in f".{name}."
