"""Qwen/Qwen3-VL-30B-A3B-Instruct."""

from __future__ import annotations

from trainer.tiny.qwen3_vl import build_qwen3_vl

# Qwen3-VL-30B-A3B-Instruct's text_config: every one of its 48 decoder layers is a mixture of 128
# experts (moe_intermediate_size 768 for hidden_size 2048), 8 routed per token with their weights
# renormalised (norm_topk_prob), decoder_sparse_step 1 and no mlp_only_layers, router_aux_loss_coef
# 0.001. Tiny: 8 experts of width 24 (768 / 2048 of the 64-wide model), 2 per token (the real 8 of
# 128 would leave a tiny model's experts nearly unused), both layers sparse.
MOE = dict(
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=24,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    router_aux_loss_coef=0.001,
)


def build():
    """Qwen/Qwen3-VL-30B-A3B-Instruct: Qwen3-VL-8B's vision and format on a mixture-of-experts Qwen3."""
    from transformers import Qwen3VLMoeConfig

    return build_qwen3_vl(Qwen3VLMoeConfig, text_extra=MOE, tie_word_embeddings=False)
