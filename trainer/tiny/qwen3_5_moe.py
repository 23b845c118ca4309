"""Qwen/Qwen3.5-35B-A3B."""

from __future__ import annotations

from trainer.tiny.qwen3_5 import build_qwen3_5, init_weights

__all__ = ["build", "init_weights"]  # build_tiny calls init_weights: Qwen3.5's slow decays

# Qwen3.5-35B-A3B's text model (config.json): width 2048, 16 query and 2 key-value heads of 256 (8:1),
# Gated DeltaNet layers of 16 key and 32 value heads of 128 (1:2, conv kernel 4), every layer a mixture
# of 256 experts of width 512 (a quarter of the model's), 8 routed per token, plus one shared expert of
# width 512 behind its sigmoid gate; router_aux_loss_coef 0.001. The tiny keeps the ratios: 8:1
# attention heads, 1:2 linear heads, experts and shared expert a quarter of the width, 4 experts with 2
# routed per token.
MOE = dict(
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=16,
    router_aux_loss_coef=0.001,
)


def build():
    """Qwen/Qwen3.5-35B-A3B: Qwen3.5's hybrid layers and vision, a mixture of experts with a shared
    expert in every layer."""
    from transformers import Qwen3_5MoeConfig

    return build_qwen3_5(
        Qwen3_5MoeConfig,
        hidden_size=64,
        attention_heads=(8, 1),
        linear_conv_kernel_dim=4,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        **MOE,
    )
