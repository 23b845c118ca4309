"""Qwen/Qwen2.5-VL-7B-Instruct: Qwen2-VL's format and grid, a windowed vision tower, absolute-time rope."""

from __future__ import annotations

import torch

from tests.families.oracles import CARPHONE
from tests.families.qwen_vl import QwenVLFacts


class TestQwen2_5_VL(QwenVLFacts):
    FAMILY = "qwen2_5_vl"
    SPECIAL_TOKENS = [*QwenVLFacts.SPECIAL_TOKENS, "<|fim_prefix|>", "<|file_sep|>"]

    def check_geometry(self, config, processor) -> None:
        vision = config.vision_config
        assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
        assert (vision.window_size, vision.tokens_per_second) == (112, 2)
        assert vision.fullatt_block_indexes == [
            vision.depth - 1
        ]  # windowed blocks, then a full-attention one
        assert vision.out_hidden_size == config.text_config.hidden_size
        head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
        assert [s * 8 for s in config.text_config.rope_parameters["mrope_section"]] == [16, 24, 24]
        assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
        assert type(processor).__name__ == "Qwen2_5_VLProcessor"
        assert processor.image_processor.size == {"shortest_edge": 3136, "longest_edge": 12845056}
        assert (processor.image_processor.merge_size, processor.video_processor.merge_size) == (2, 2)

    def check_video_time(self, steps: torch.Tensor, ref) -> None:
        # Absolute time: a temporal patch of 2 frames spans 2 / sampled fps seconds, the sampled fps being
        # 6 frames over the clip's 120 frames at 29.97 fps (not the processor's 24-fps guess), and each
        # second of video is 2 rope steps (tokens_per_second).
        from data_tools.video import VideoPolicy, decode_video

        clip = decode_video(CARPHONE.read_bytes(), VideoPolicy(), 6)
        seconds = 2 / clip.sample_fps
        assert abs(seconds - 2 / (6 / 120 * 29.97)) < 1e-3
        assert torch.allclose(ref["second_per_grid_ts"], torch.tensor([seconds]))
        assert steps.tolist() == [int(k * seconds * 2) for k in range(3)] == [0, 2, 5]
