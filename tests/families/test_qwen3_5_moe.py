"""Qwen/Qwen3.5-35B-A3B: Qwen3.5's processor, template and hybrid layers, each with a mixture of experts
and a shared expert; packs keep every sample's own logits."""

from __future__ import annotations

import torch

from tests.families.qwen3_5_facts import Qwen3_5Facts


class TestQwen3_5Moe(Qwen3_5Facts):
    FAMILY = "qwen3_5_moe"
    ATTENTION_HEADS = (16, 2)  # Qwen3.5-35B-A3B's query and key-value heads
    LINEAR_HEADS = (16, 32)  # its Gated DeltaNet key and value heads
    LORA_OVERRIDES = ["finetune.lora.experts=true"]  # the exported adapter carries the experts' LoRA
    QLORA_REFUSED = True  # its experts are 3-D parameters bitsandbytes does not quantize (trainer/moe.py)

    def test_every_layer_is_a_mixture_of_experts_with_a_shared_expert(self, path) -> None:
        """The published router: 8 of 256 experts per token, router_aux_loss_coef 0.001; the tiny routes 2
        of 4. The experts are 3-D parameters: LoRA's default targets (attention, linear attention, shared
        expert) leave them and the router out."""
        from trainer.config import FinetuneConfig
        from trainer.lora import lora_targets
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        text = adapter.config.text_config
        assert (text.num_experts, text.num_experts_per_tok, text.router_aux_loss_coef) == (4, 2, 0.001)
        assert text.shared_expert_intermediate_size == text.moe_intermediate_size == text.hidden_size // 4
        model = adapter.load_model(dtype=torch.float32)
        experts = [n for n, p in model.named_parameters() if ".mlp.experts." in n]
        assert experts and all(p.ndim == 3 for n, p in model.named_parameters() if n in experts)
        targets = lora_targets(adapter, model, FinetuneConfig())
        assert any(t.endswith("linear_attn.in_proj_qkv") for t in targets)
        assert any(t.endswith("self_attn.q_proj") for t in targets)
        assert any(t.endswith("mlp.shared_expert.up_proj") for t in targets)
        assert not any(".experts" in t or t.endswith("mlp.gate") for t in targets)
