"""zai-org/GLM-4.5V (tests/families/glm4v_facts.py): GLM-4.1V's vision and media on a mixture-of-experts
GLM-4.5-Air, GLM-4.5's chat format with its reasoning blocks."""

from __future__ import annotations

import torch

from tests.families.glm4v_facts import GLM_SPECIAL_TOKENS, GlmVFacts

REASONING = [
    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "<think>Greet.</think>Hello."}]},
    {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "<think>\nPart.\n</think>\n\nBye."}]},
]


class TestGlm4vMoe(GlmVFacts):
    FAMILY = "glm4v_moe"
    LORA_OVERRIDES = ["finetune.lora.experts=true"]  # the exported adapter carries the experts' LoRA
    QLORA_REFUSED = True  # 4-bit layers replace nn.Linear only, not the 3-D experts (trainer/moe.py)
    SPECIAL_TOKENS = [*GLM_SPECIAL_TOKENS, "<think>", "</think>", "/nothink", "<|begin_of_box|>"]
    # Every answer shows a reasoning block, empty where it has none (and for answers before the last user
    # message, which the published template renders without their reasoning).
    FULL_RENDER = (
        "[gMASK]<sop><|system|>\nYou are terse.<|user|>\nWhat is this?"
        "<|begin_of_image|><|image|><|end_of_image|><|assistant|>\n<think></think>\nAn astronaut."
        "<|user|>\n<|begin_of_image|><|image|><|end_of_image|>And this?"
        "<|assistant|>\n<think></think>\nA palace."
    )
    ASSISTANT_TEXT = "<think></think>\nAn astronaut.<think></think>\nA palace."
    TEXT_ONLY_RENDER = (
        "[gMASK]<sop><|user|>\nHi<|assistant|>\n<think></think>\nHello.<|user|>\nab<|assistant|>\n"
    )
    TRAINING_RENDER = FULL_RENDER + "<|user|>"

    def check_geometry(self, config, processor) -> None:
        super().check_geometry(config, processor)
        text = config.text_config
        # GLM-4.5V: attention wider than the model (96 heads of 128 over 4096), layer 0 dense, the
        # others 8 of 128 routed experts plus 1 shared, grouped routing in 1 group, weights renormalised.
        assert text.num_attention_heads * text.head_dim > text.hidden_size
        assert text.first_k_dense_replace == 1 < text.num_hidden_layers
        assert 2 <= text.num_experts_per_tok < text.n_routed_experts and text.n_shared_experts == 1
        assert (text.n_group, text.topk_group, text.norm_topk_prob) == (1, 1, True)
        assert text.routed_scaling_factor == 1.0 and text.router_aux_loss_coef == 0.0001
        assert text.moe_intermediate_size < text.intermediate_size
        assert config.vision_config.model_type == "glm4v_moe_vision"

    def test_one_dense_layer_then_experts(self, path) -> None:
        from transformers import AutoModelForImageTextToText

        layers = AutoModelForImageTextToText.from_pretrained(path).model.language_model.layers
        assert [type(layer.mlp).__name__ for layer in layers] == ["Glm4vMoeTextMLP", "Glm4vMoeTextMoE"]
        experts = layers[1].mlp.experts
        assert experts.gate_up_proj.ndim == experts.down_proj.ndim == 3  # [experts, out, in]
        assert experts.gate_up_proj.shape[0] == 8
        # The router's score correction (a buffer) is saved and loaded, non-zero as in a released model.
        assert layers[1].mlp.gate.e_score_correction_bias.tolist() == torch.linspace(-0.1, 0.1, 8).tolist()

    def test_every_answer_keeps_its_reasoning(self, path) -> None:
        """The published template shows only the last answer's reasoning; mmloom renders every answer's
        (trainer/models/glm4v.py), so the first answer can be cut out of the whole conversation, and
        trains on it."""
        from transformers import AutoProcessor

        from tests.support.samples import sample
        from trainer.data.render import IGNORE, render_sample
        from trainer.models.registry import get_adapter

        published = AutoProcessor.from_pretrained(path).apply_chat_template(REASONING)
        assert published == (
            "[gMASK]<sop><|user|>\nHi<|assistant|>\n<think></think>\nHello."
            "<|user|>\nBye<|assistant|>\n<think>Part.</think>\nBye."
        )
        adapter = get_adapter(path)
        assert adapter.processor.apply_chat_template(REASONING) == (
            "[gMASK]<sop><|user|>\nHi<|assistant|>\n<think>Greet.</think>\nHello."
            "<|user|>\nBye<|assistant|>\n<think>Part.</think>\nBye.<|user|>"
        )
        turns = [(m["role"], [m["content"][0]["text"]]) for m in REASONING]
        r = render_sample(adapter, sample("r", turns), {})
        trained = adapter.tokenizer.decode(r.input_ids[r.labels != IGNORE])
        assert trained == "<think>Greet.</think>\nHello.<|user|><think>Part.</think>\nBye.<|user|>"
        ids = adapter.processor.apply_chat_template(
            REASONING, tokenize=True, return_dict=True, return_tensors="pt"
        )
        assert torch.equal(r.input_ids, ids["input_ids"][0])
