"""Qwen/Qwen3.5-27B: Qwen3-VL's processor and rope on a hybrid language model (3 of 4 layers Gated
DeltaNet linear attention), the thinking chat template; packs keep every sample's own logits."""

from __future__ import annotations

from tests.families.qwen3_5_facts import Qwen3_5Facts


class TestQwen3_5(Qwen3_5Facts):
    FAMILY = "qwen3_5"
    ATTENTION_HEADS = (24, 4)  # Qwen3.5-27B's query and key-value heads
    LINEAR_HEADS = (16, 48)  # its Gated DeltaNet key and value heads
