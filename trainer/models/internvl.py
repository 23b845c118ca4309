"""InternVL3 (transformers-native "-hf" checkpoints): InternViT tiles, pixel shuffle, Qwen2 ChatML.

Each image becomes 1 to 12 448-px tiles picked by aspect ratio, plus a thumbnail when it has more than
one, stacked as `pixel_values` [tiles, 3, 448, 448] with no per-image metadata: the model matches
tiles to the <IMG_CONTEXT> runs (256 per tile, between <img> and </img>) in order, so segments and
packed samples simply concatenate along the tile dimension. Positions are 1-D and restart per sample;
the Qwen2 text model builds the block-diagonal mask from them. The projector is
`multi_modal_projector` (layer norm + MLP), the tower `vision_tower`: the generic groups apply.
The original remote-code checkpoints (model_type internvl_chat) are not supported: convert them with
transformers' convert_internvl_weights_to_hf.py.
"""

from __future__ import annotations

from trainer.models.adapter import ModelAdapter
from trainer.models.registry import register


@register
class InternVLAdapter(ModelAdapter):
    family = "internvl"
    model_types = ("internvl",)
    example = "OpenGVLab/InternVL3-8B-hf"
    # Video frames arrive as extra tiles in pixel_values too (the processor folds them in).
    media_keys = ("pixel_values",)
    end_of_turn_tokens = ("<|im_end|>",)
