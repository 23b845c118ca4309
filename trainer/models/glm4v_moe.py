"""GLM-4.5V: GLM-4.1V's vision tower, media tensors, rope index and chat format on a mixture-of-experts
GLM-4.5-Air language model.

Rendering, packing and positions are GLM-4.1V's (trainer/models/glm4v.py: same processor class, the
model's `get_rope_index` is the same code); the template change that matters here is the third there
(every answer keeps its reasoning). The decoder's first layer is dense, the others route each token to
8 of 128 experts (sigmoid scores with a learned correction bias, renormalised, routed_scaling_factor 1)
beside one shared expert; what the experts add to training (router loss, expert metrics, LoRA on the
3-D expert weights) is in trainer/moe.py.
"""

from __future__ import annotations

from typing import Any

from trainer.models.glm4v import Glm4vAdapter
from trainer.models.registry import register


@register
class Glm4vMoeAdapter(Glm4vAdapter):
    family = "glm4v_moe"
    model_types = ("glm4v_moe",)
    example = "zai-org/GLM-4.5V"

    def _model_class(self) -> Any:
        from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeModel

        return Glm4vMoeModel
