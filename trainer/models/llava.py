"""LLaVA 1.5 (llava-hf): the generic path fits; listed so the family has a name and a home."""

from __future__ import annotations

from trainer.models.adapter import ModelAdapter
from trainer.models.registry import register


@register
class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_types = ("llava",)
    media_keys = ("pixel_values",)
    example = "llava-hf/llava-1.5-7b-hf"
