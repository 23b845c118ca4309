"""MiniCPM-V 4.6 (transformers-native `minicpmv4_6`): a SigLIP2 NaViT tower over MiniCPM-V's adaptive
slices, a Qwen3.5 hybrid language model (three Gated DeltaNet linear-attention layers to one full
attention layer), Qwen3.5's ChatML with think blocks. What mmloom does about each:

- Media: every image is a 448-px source view plus up to 9 slices of its best grid, each slice's 14-px
  patches flattened into one NaViT row, `pixel_values` [1, 3, 14, sum of patches x 14] with
  `target_sizes` [views, 2] (patches high and wide). Segments and packed samples concatenate the rows
  on the last dimension and the sizes on the first: the tower runs each view apart (per-view
  attention, windows and position embeddings), so features come out the same and in order. Every
  view costs h x w / 16 tokens (16x: the 2x2 window merger inside the tower, then the 2x2 merger).
- Videos are native: each sampled frame is a source view (and its slices) of its own, written as
  <image>...</image> blocks of <|video_pad|>. The model would encode images and videos in two tower
  calls, whose FSDP block units would be gathered once on one rank and twice on another, so
  `model_inputs` hands the video views to the model as image views, in the order of their tokens,
  video tokens relabelled as image tokens (their embeddings are replaced by the features anyway):
  one tower call per forward whatever the pack holds, the same features. The model encodes images and
  videos with one `downsample_mode`, from config.json, while the processor counts tokens with its own
  (processor_config.json): `prepare` runs the model at the processor's, which the export records.
- Image ids: the processor writes <image_id>k</image_id> before every image (and video), k counting
  from 0 in each text it is given. mmloom tokenizes a conversation a segment at a time, so `chat_text`
  writes the ids into the rendered conversation, numbered over the whole of it as inference numbers
  them, and `process` has the processor leave them out (use_image_id=False).
- Think blocks: the published template (Qwen3.5's, thinking off by default) gives the generation
  prompt an empty think block ("<think>\\n\\n</think>\\n\\n") and an answer after the last user query
  its think block, but writes earlier answers without theirs, so a turn's prompt is no prefix of the
  conversation once another user turn follows and render_sample could not place labels. mmloom
  renders with Qwen3.5's `training_template` (trainer/models/qwen3_5.py), which keeps every answer's
  think block; the processor carries it, and so does the export. Each answer then follows exactly
  the generation prompt inference gives it, as LLaMA-Factory trains Qwen3-style templates and as
  MiniCPM-V's own LLaMA-Factory recipe writes data (an empty think block before every answer); the
  prompts of later turns differ from the published template's only in the empty think blocks of the
  earlier answers. Answers that carry their own reasoning ("<think>...</think>", thinking mode) do
  not follow the non-thinking prompt and are skipped as template_not_prefix_consistent.
- Packing: the Gated DeltaNet layers carry a recurrent state and a causal convolution from token to
  token whatever the mask says (transformers' CPU fallback refuses a pack's boundaries). `prepare`
  makes them run each packed sample apart (trainer/linear_attention.py), so packs are exact and
  `packs_isolated` holds; the full-attention layers get the block-diagonal mask of the restarting
  positions (SDPA: attention.choose picks the packed backends only for models without such layers).
- The model's forward takes no `logits_to_keep`: it would project every position of a pack onto the
  248k-token vocabulary in fp32 (8 GB for 8192 tokens). `prepare` gives it one, as transformers'
  other models have, so the trainer projects the target positions only.
- Parameter groups as LLaMA-Factory's: `model.vision_tower` (its window merger inside) is the
  vision group, `model.merger` the projector, `model.language_model` and `lm_head` the LLM.
"""

from __future__ import annotations

import functools
import inspect
import logging
from functools import cached_property
from typing import Any

import torch

from trainer.linear_attention import apply_per_sample
from trainer.models.adapter import ModelAdapter
from trainer.models.checkpoint import Checkpoint
from trainer.models.qwen3_5 import training_template
from trainer.models.registry import register

logger = logging.getLogger(__name__)


@register
class MiniCPMV4_6Adapter(ModelAdapter):
    family = "minicpmv4_6"
    model_types = ("minicpmv4_6",)
    example = "openbmb/MiniCPM-V-4.6"
    media_keys = ("pixel_values", "target_sizes", "pixel_values_videos", "target_sizes_videos")
    media_cat_dim = {"pixel_values": -1, "pixel_values_videos": -1}
    end_of_turn_tokens = ("<|im_end|>",)
    process_kwargs = {"use_image_id": False}  # chat_text writes the ids
    video = "native"
    # Checked in order: the window merger (vision_tower.vit_merger) belongs to the tower.
    group_patterns = (("vision", ("vision_tower.",)), ("projector", ("merger.",)))

    def attention_backend(self, device: torch.device) -> str:
        """By the full-attention layers of its Qwen3.5 alone: the linear-attention ones run per sample."""
        from trainer import attention

        model_class = self.auto_class()._model_mapping.get(type(self.config), None)
        return attention.choose_hybrid(self.config, model_class, device)

    # --- rendering -----------------------------------------------------------------------------------

    @cached_property
    def processor(self) -> Any:
        """The checkpoint's processor with the template mmloom renders with: Qwen3.5's training_template
        (every answer keeps its think block; thinking off unless asked for, as published)."""
        proc = Checkpoint.processor.func(self)  # type: ignore[attr-defined]
        proc.chat_template = training_template(proc.chat_template)
        if getattr(proc.tokenizer, "chat_template", None):  # saved beside the processor's on export
            proc.tokenizer.chat_template = training_template(proc.tokenizer.chat_template)
        return proc

    def chat_text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The rendered conversation with the processor's <image_id>k</image_id> tags written in."""
        text = super().chat_text(messages, add_generation_prompt)
        proc = self.processor
        if not proc.default_use_image_id:
            return text
        start, end = proc.image_id_start_token, proc.image_id_end_token
        for token in (self.image_token, self.video_token):  # images and videos are numbered apart
            first, *rest = text.split(token)
            text = first + "".join(f"{start}{k}{end}{token}{piece}" for k, piece in enumerate(rest))
        return text

    # --- batching --------------------------------------------------------------------------------------

    @property
    def packs_isolated(self) -> bool:
        """Packed samples stay apart in every layer: attention by the pack's boundaries, the
        linear-attention layers because `prepare` runs them once per sample."""
        return True

    @cached_property
    def downsample_mode(self) -> str:
        """The token merge ("16x" or "4x") the processor counts image and video tokens with."""
        image = self.processor.image_processor.downsample_mode
        video = self.processor.video_processor.downsample_mode
        if image != video:
            raise ValueError(
                f"{self.path}/processor_config.json: image_processor.downsample_mode={image!r} but "
                f"video_processor.downsample_mode={video!r}; the model encodes both in one mode: set both"
            )
        return image

    def model_inputs(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        media: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        input_ids, media = self.videos_as_images(input_ids, media)
        return super().model_inputs(input_ids, labels, position_ids, media)

    def videos_as_images(
        self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The video views of a packed sequence as image views, interleaved with the images' in the order
        of their tokens (each view a run of h x w / 16 tokens, or / 4 at "4x"), video tokens relabelled."""
        if "pixel_values_videos" not in media:
            return input_ids, media
        image_id, video_id = self.config.image_token_id, self.config.video_token_id
        patch = self.processor.image_processor.patch_size
        divisor = 4 if self.downsample_mode == "4x" else 16
        media = dict(media)
        video_sizes, videos = media.pop("target_sizes_videos"), media.pop("pixel_values_videos")
        sizes = {image_id: media.pop("target_sizes", video_sizes[:0]), video_id: video_sizes}
        rows = {image_id: media.pop("pixel_values", videos[..., :0]), video_id: videos}
        # A view of h x w patches is h * w * 14 columns of its row.
        views = {kind: rows[kind].split((sizes[kind].prod(-1) * patch).tolist(), dim=-1) for kind in sizes}
        tokens = input_ids[(input_ids == image_id) | (input_ids == video_id)].tolist()
        order, taken, pos = [], {image_id: 0, video_id: 0}, 0
        while pos < len(tokens):  # each view: a run of its tokens
            kind = tokens[pos]
            order.append((kind, taken[kind]))
            pos += int(sizes[kind][taken[kind]].prod()) // divisor
            taken[kind] += 1
        assert taken == {k: len(s) for k, s in sizes.items()}, "media tokens do not match the views"
        media["pixel_values"] = torch.cat([views[k][i] for k, i in order], dim=-1)
        media["target_sizes"] = torch.stack([sizes[k][i] for k, i in order])
        return torch.where(input_ids == video_id, image_id, input_ids), media

    # --- building --------------------------------------------------------------------------------------

    def prepare(self, model: Any) -> Any:
        """`model` made to train on packs: its linear-attention layers run each packed sample apart
        (trainer/linear_attention.py), its forward takes `logits_to_keep`, and it encodes media with the
        processor's downsample_mode."""
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

        mode = self.downsample_mode
        if model.config.downsample_mode != mode:
            logger.info(
                "%s: the model encodes media at the processor's downsample_mode %s (config.json: %s)",
                self.path,
                mode,
                model.config.downsample_mode,
            )
            model.config.downsample_mode = mode
        model.__class__ = with_logits_to_keep(type(model))
        apply_per_sample(model, lambda module: isinstance(module, Qwen3_5GatedDeltaNet))
        return super().prepare(model)


@functools.cache
def with_logits_to_keep(model_class: type) -> type:
    """`model_class` (MiniCPMV4_6ForConditionalGeneration) whose forward projects only the positions
    `logits_to_keep` names (the last n, or a tensor of indices) onto the vocabulary."""
    if "logits_to_keep" in inspect.signature(model_class.forward).parameters:
        return model_class
    from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast

    class Model(model_class):
        def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
            out = self.model(input_ids=input_ids, **kwargs)
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(out.last_hidden_state[:, keep, :])
            loss = None
            if labels is not None:
                vocab = self.config.text_config.vocab_size
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab, **kwargs)
            rest = {k: v for k, v in out.items() if k != "last_hidden_state"}  # cache, media outputs, ...
            return MultimodalCausalLMOutputWithPast(loss=loss, logits=logits, **rest)

    # save_pretrained writes the class name into config.json's architectures.
    Model.__name__ = Model.__qualname__ = model_class.__name__
    return Model
