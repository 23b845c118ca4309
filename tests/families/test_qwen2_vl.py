"""Qwen/Qwen2-VL-2B-Instruct: ChatML turns, 14-px patches merged 2x2, 2-frame temporal patches, 3-D rope."""

from __future__ import annotations

from tests.families.qwen_vl import QwenVLFacts


class TestQwen2VL(QwenVLFacts):
    FAMILY = "qwen2_vl"

    def check_geometry(self, config, processor) -> None:
        vision = config.vision_config
        assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
        head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
        sections = config.text_config.rope_parameters["mrope_section"]
        assert sum(sections) == head_dim // 2
        assert [s * 8 for s in sections] == [16, 24, 24]  # the 2B model's sections for head_dim 128, scaled
        assert processor.image_processor.size["shortest_edge"] == 56 * 56
        assert processor.image_processor.size["longest_edge"] == 28 * 28 * 1280
        assert (processor.image_processor.merge_size, processor.video_processor.merge_size) == (2, 2)
