"""Qwen/Qwen3-VL-30B-A3B-Instruct: Qwen3-VL (tests/families/qwen3_vl_facts.py) on a mixture-of-experts
Qwen3 whose router loss, expert load and expert LoRA are trainer/moe.py's (tests/unit/test_moe.py)."""

from __future__ import annotations

from tests.families.qwen3_vl_facts import Qwen3VLFacts


class TestQwen3VLMoe(Qwen3VLFacts):
    FAMILY = "qwen3_vl_moe"
    LORA_OVERRIDES = ["finetune.lora.experts=true"]  # the exported adapter carries the experts' LoRA
    QLORA_REFUSED = True

    def check_geometry(self, config, processor) -> None:
        super().check_geometry(config, processor)
        text = config.text_config
        assert not config.tie_word_embeddings
        # Every decoder layer sparse, as in the 30B-A3B (decoder_sparse_step 1, no mlp_only_layers).
        assert (text.decoder_sparse_step, text.mlp_only_layers) == (1, [])
        assert text.num_experts > text.num_experts_per_tok > 1
        assert text.router_aux_loss_coef == 0.001
        assert text.moe_intermediate_size / text.hidden_size == 768 / 2048
