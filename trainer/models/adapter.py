"""Model adapters: what mmloom knows about a model family, in one small object.

The generic adapter works for any `AutoModelForImageTextToText` checkpoint whose processor has
a chat template: processor media outputs are concatenated along their first dimension, positions
are 1-D and restart per sample. A family overrides only what differs (3-D rope indices, media
tensors with a batch dimension, end-of-turn tokens, video decoding), in one file that registers
it (registry.py). The adapter is three parts, each for the code that uses it: rendering.py,
batching.py, building.py (checkpoint.py: what they share).

    adapter = get_adapter("/ckpt/qwen2-vl-2b")        # trainer.models.registry; family from model_type
    out = adapter.process(text, images, videos, first=True)
"""

from __future__ import annotations

from typing import ClassVar

from trainer.models.batching import Batching
from trainer.models.building import Building
from trainer.models.rendering import IGNORE, VideoFrames

__all__ = ["IGNORE", "ModelAdapter", "VideoFrames"]


class ModelAdapter(Batching, Building):
    model_types: ClassVar[tuple[str, ...]] = ()  # transformers model_type values this adapter serves
    example: ClassVar[str] = ""  # a real Hugging Face checkpoint of the family
