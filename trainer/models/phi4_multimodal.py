"""Phi-4-multimodal (the transformers-native port): one causal LM (AutoModelForCausalLM, not an
image-text-to-text class) whose token embedding merges a SigLIP image encoder and a conformer audio
encoder. Images are dynamic-HD stacks of 448-px crops: `image_pixel_values` [images, crops, 3, 448,
448] with `image_attention_mask` [images, crops, 32, 32] (which patches are padding) and
`image_sizes` [images, 2] (the HD canvas, from which the model counts each image's crops). The
processor pads the crop dimension to the largest image of its call (zero pixels, all-ones masks) and
the model drops those crops again, so segments and packed samples are concatenated along the image
dimension after padding their crop dimension the same way.

Turns end with <|end|> (the tokenizer's EOS is <|endoftext|>). The published template appends that
EOS after the last turn of a conversation rendered without the generation prompt, so no conversation
would be a prefix of a longer one: `chat_text` drops it (turns are still trained through <|end|>).
The audio tower is never fed (mmloom sends no audio); its parameters count as a media encoder with the
vision tower (frozen by default, never quantized), and its `encoders` blocks never get LoRA. In
transformers 5.23-5.25 the processor loses its chat template on loading (see `processor`; a strict xfail in
tests/families/test_phi4_multimodal.py fails once a release fixes it).

Checkpoints: the HF-native release ships its vision and speech LoRA as PEFT adapters beside the base
weights (vision-lora/, speech-lora/); merge the vision one into the base (peft merge_and_unload,
save_pretrained) and point model.path at that before finetuning on images. Rope is longrope, whose factors
switch once the largest position id passes 4096: under packing that is the longest sample of the
pack, so samples longer than 4096 tokens make their pack mates use the long factors too.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from trainer.models.adapter import ModelAdapter
from trainer.models.registry import register


@register
class Phi4MultimodalAdapter(ModelAdapter):
    family = "phi4_multimodal"
    model_types = ("phi4_multimodal",)
    example = "microsoft/Phi-4-multimodal-instruct"
    media_keys = ("image_pixel_values", "image_attention_mask", "image_sizes")
    end_of_turn_tokens = ("<|end|>",)
    group_patterns = (
        (
            "projector",
            (
                "image_embed.img_projection_",
                "image_embed.global_img_feature_extensor",
                "image_embed.sub_img_feature_extensor",
            ),
        ),
        ("vision", ("image_embed.img_processor.", "audio_embed.")),
    )

    @classmethod
    def auto_class(cls) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    @cached_property
    def processor(self) -> Any:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(self.path, local_files_only=True)
        # transformers 5.23-5.25: Phi4MultimodalProcessor.__init__ does not name `chat_template`, so
        # from_pretrained drops the checkpoint's chat_template.jinja; the tokenizer reads the same file.
        if proc.chat_template is None:
            proc.chat_template = proc.tokenizer.chat_template
        if proc.chat_template is None:
            raise ValueError(
                f"{self.path}: the processor has no chat template; mmloom renders conversations "
                f"with it. Add chat_template.jinja to the checkpoint."
            )
        return proc

    def chat_text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        text = super().chat_text(messages, add_generation_prompt)
        eos = self.tokenizer.eos_token
        # The published template's final EOS would sit inside later turns' text otherwise (module docstring).
        if not add_generation_prompt and text.endswith("<|end|>" + eos):
            text = text[: -len(eos)]
        return text

    def has_vision_inputs(self, media: dict[str, torch.Tensor]) -> bool:
        return "image_pixel_values" in media

    def collate_media(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Concatenate images of segments or packed samples, padding the crop dimension as the
        processor does for images of one call: zero crops whose patches are all unmasked."""
        parts = [p for p in parts if "image_pixel_values" in p]
        if not parts:
            return {}
        crops = max(p["image_pixel_values"].shape[1] for p in parts)

        def pad(x: torch.Tensor, value: float) -> torch.Tensor:
            return F.pad(x, (0, 0) * (x.dim() - 2) + (0, crops - x.shape[1]), value=value)

        return {
            "image_attention_mask": torch.cat([pad(p["image_attention_mask"], 1) for p in parts]),
            "image_pixel_values": torch.cat([pad(p["image_pixel_values"], 0) for p in parts]),
            "image_sizes": torch.cat([p["image_sizes"] for p in parts]),
        }
