"""SmolVLM2: Idefics3's architecture and image tiling with a SmolLM2 text model, so Idefics3's media
handling applies unchanged: image tiles carry a batch dimension ([1, tiles, 3, 384, 384] with a pixel
attention mask), packed samples concatenate along the tile dimension, and turns end with
<end_of_utterance>. The tiles are 384 px of 14-px patches, pixel-shuffled by 3 to 81 tokens.

SmolVLM (v1) checkpoints are model_type idefics3 and load with the idefics3 adapter. The processor
needs the `num2words` package (it spells out frame counts in video prompts).
"""

from __future__ import annotations

from trainer.models.idefics3 import Idefics3Adapter
from trainer.models.registry import register


@register
class SmolVLMAdapter(Idefics3Adapter):
    family = "smolvlm"
    model_types = ("smolvlm",)
    example = "HuggingFaceTB/SmolVLM2-2.2B-Instruct"
