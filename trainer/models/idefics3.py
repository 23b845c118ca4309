"""Idefics3 / SmolVLM: image tiles carry a batch dimension ([1, tiles, 3, H, W]); packed samples
concatenate along the tile dimension, and turns end with <end_of_utterance>."""

from __future__ import annotations

from trainer.models.adapter import ModelAdapter
from trainer.models.registry import register


@register
class Idefics3Adapter(ModelAdapter):
    family = "idefics3"
    model_types = ("idefics3",)
    example = "HuggingFaceM4/Idefics3-8B-Llama3"
    media_keys = ("pixel_values", "pixel_attention_mask")
    media_cat_dim = {"pixel_values": 1, "pixel_attention_mask": 1}
    end_of_turn_tokens = ("<end_of_utterance>",)
    media_token_pattern = r"<row_\d+_col_\d+>|<global-img>"

    # One tile is enough to run the vision tower; a small image is split into 17 otherwise.
    dummy_kwargs = {"images_kwargs": {"do_image_splitting": False}}
