"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B, 235B-A22B): Qwen3-VL whose decoder MLPs are mixtures of experts.

Rendering, packing and positions are Qwen3-VL's (same processor, same rope index). What the experts
add is in trainer/moe.py: the router's load-balancing loss (the model adds it only when it computes the
loss itself), expert load metrics, LoRA on the experts' 3-D weights and the grouped-GEMM expert forward.
"""

from __future__ import annotations

from typing import Any

from trainer.models.qwen3_vl import Qwen3VLAdapter
from trainer.models.registry import register


@register
class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
    example = "Qwen/Qwen3-VL-30B-A3B-Instruct"

    def _model_class(self) -> Any:
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeModel

        return Qwen3VLMoeModel
