"""HuggingFaceM4/Idefics3-8B-Llama3: "User:/Assistant:" turns, 364-px tiles of 169 tokens plus a
global image."""

from __future__ import annotations

import math

from tests.families.oracles import FamilyOracles


def tiles(height: int, width: int) -> tuple[int, int]:
    """Rows and columns of 364-px tiles: longest edge resized to 4 * 364 (other edge rounded up to even),
    then both edges rounded up to multiples of 364, as the real preprocessor does."""
    if width >= height:
        height, width = int(1456 / (width / height)), 1456
        height += height % 2
    else:
        height, width = 1456, int(1456 * (width / height))
        width += width % 2
    return math.ceil(height / 364), math.ceil(width / 364)


class TestIdefics3(FamilyOracles):
    FAMILY = "idefics3"
    SPECIAL_TOKENS = [
        "<|begin_of_text|>",
        "<end_of_utterance>",
        "<image>",
        "<fake_token_around_image>",
        "<global-img>",
        "<row_1_col_1>",
        "<row_4_col_3>",
        "<row_6_col_6>",
    ]
    TOKENIZER_ROLES = ("<|begin_of_text|>", "<end_of_utterance>", "<|reserved_special_token_0|>", True)
    FULL_RENDER = (
        "<|begin_of_text|>System: You are terse.<end_of_utterance>\n"
        "User: What is this?<image><end_of_utterance>\n"
        "Assistant: An astronaut.<end_of_utterance>\n"
        "User:<image>And this?<end_of_utterance>\n"
        "Assistant: A palace.<end_of_utterance>\n"
    )
    GENERATION_PROMPT = "Assistant:"
    ASSISTANT_TEXT = " An astronaut.<end_of_utterance> A palace.<end_of_utterance>"
    TEXT_ONLY_RENDER = (
        "<|begin_of_text|>User: Hi<end_of_utterance>\nAssistant: Hello.<end_of_utterance>\n"
        "User: ab<end_of_utterance>\nAssistant:"
    )
    MAX_TOKENS = 8192

    def expected_image_tokens(self, image) -> int:
        rows, cols = tiles(image.size[1], image.size[0])
        return (rows * cols + 1) * 169  # tiles plus the global image, 169 = (364 / 14) ** 2 / 2 ** 2

    def check_geometry(self, config, processor) -> None:
        assert (config.vision_config.image_size, config.vision_config.patch_size) == (364, 14)
        assert config.scale_factor == 2
        assert processor.image_seq_len == 169
        assert processor.image_processor.size["longest_edge"] == 4 * 364
        assert processor.image_processor.max_image_size == {"longest_edge": 364}
        assert processor.image_processor.do_image_splitting

    def check_real_images(self, out, processor) -> None:
        assert tiles(512, 512) == (4, 4) and tiles(427, 640) == (3, 4)
        ids, tok = out["input_ids"][0], processor.tokenizer
        count = lambda t: int((ids == tok.convert_tokens_to_ids(t)).sum())  # noqa: E731
        assert count("<global-img>") == 2 and count("<row_4_col_4>") == 1 and count("<row_3_col_4>") == 2
        assert count("<fake_token_around_image>") == (16 + 2) + (12 + 2)
        assert out["pixel_values"].shape[:2] == (1, 17 + 13)
