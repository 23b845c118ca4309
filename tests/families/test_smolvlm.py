"""HuggingFaceTB/SmolVLM2-2.2B-Instruct: Idefics3's "User:/Assistant:" turns after "<|im_start|>", 384-px
tiles of 81 tokens plus a global image."""

from __future__ import annotations

import math

from tests.families.oracles import FamilyOracles


def tiles(height: int, width: int) -> tuple[int, int]:
    """Rows and columns of 384-px tiles: longest edge resized to 4 * 384 = 1536 (preprocessor size), the
    other edge scaled and rounded up to even, then both rounded up to multiples of 384 (max_image_size)."""
    if width >= height:
        height, width = int(1536 / (width / height)), 1536
        height += height % 2
    else:
        height, width = 1536, int(1536 * (width / height))
        width += width % 2
    return math.ceil(height / 384), math.ceil(width / 384)


class TestSmolVLM(FamilyOracles):
    FAMILY = "smolvlm"
    SPECIAL_TOKENS = [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<end_of_utterance>",
        "<image>",
        "<fake_token_around_image>",
        "<global-img>",
        "<row_1_col_1>",
        "<row_4_col_3>",
        "<row_6_col_6>",
    ]
    TOKENIZER_ROLES = ("<|im_start|>", "<end_of_utterance>", "<|im_end|>", False)
    FULL_RENDER = (
        "<|im_start|>System: You are terse.<end_of_utterance>\n"
        "User: What is this?<image><end_of_utterance>\n"
        "Assistant: An astronaut.<end_of_utterance>\n"
        "User:<image>And this?<end_of_utterance>\n"
        "Assistant: A palace.<end_of_utterance>\n"
    )
    GENERATION_PROMPT = "Assistant:"
    ASSISTANT_TEXT = " An astronaut.<end_of_utterance> A palace.<end_of_utterance>"
    TEXT_ONLY_RENDER = (
        "<|im_start|>User: Hi<end_of_utterance>\nAssistant: Hello.<end_of_utterance>\n"
        "User: ab<end_of_utterance>\nAssistant:"
    )

    def expected_image_tokens(self, image) -> int:
        rows, cols = tiles(image.size[1], image.size[0])
        return (rows * cols + 1) * 81  # tiles plus the global image, 81 = (384 // 14) ** 2 / 3 ** 2

    def check_geometry(self, config, processor) -> None:
        assert (config.vision_config.image_size, config.vision_config.patch_size) == (384, 14)
        assert config.scale_factor == 3
        assert processor.image_seq_len == 81
        assert processor.image_processor.size["longest_edge"] == 4 * 384
        assert processor.image_processor.max_image_size == {"longest_edge": 384}
        assert processor.image_processor.do_image_splitting
        assert processor.video_processor.max_image_size == {"longest_edge": 384}
        assert (processor.video_processor.fps, processor.video_processor.num_frames) == (1, 64)
        assert not config.tie_word_embeddings

    def check_real_images(self, out, processor) -> None:
        assert tiles(512, 512) == (4, 4) and tiles(427, 640) == (3, 4)
        ids, tok = out["input_ids"][0], processor.tokenizer

        def count(token: str) -> int:
            return int((ids == tok.convert_tokens_to_ids(token)).sum())

        assert count("<global-img>") == 2 and count("<row_4_col_4>") == 1 and count("<row_3_col_4>") == 2
        assert count("<fake_token_around_image>") == (16 + 2) + (12 + 2)
        assert out["pixel_values"].shape == (1, 17 + 13, 3, 384, 384)
        assert out["pixel_attention_mask"].shape == (1, 17 + 13, 384, 384)

    def test_the_dummy_image_is_one_tile(self, path) -> None:
        # The grey image text-only packs carry runs the vision tower on a single 384-px tile, not 17.
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        ids, media, positions = adapter.dummy_image
        assert type(adapter).__name__ == "SmolVLMAdapter"
        assert media["pixel_values"].shape == (1, 1, 3, 384, 384)
        assert int((ids == adapter.config.image_token_id).sum()) == 81
        assert positions.tolist() == list(range(len(ids)))
