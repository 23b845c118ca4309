"""llava-hf/llava-v1.6-mistral-7b-hf: Mistral instruct turns, AnyRes views of 336 px."""

from __future__ import annotations

from tests.families.oracles import FamilyOracles

PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


def anyres_grid(height: int, width: int, pinpoints: list[tuple[int, int]], tile: int,
                per_tile: int) -> tuple[int, int]:
    """Feature rows and columns of an image's tiles, as the original LLaVA-NeXT code picks them: the
    pinpoint that keeps the most pixels (then wastes the least), `per_tile` x `per_tile` features per
    `tile`-px tile, rows (or columns) of pure padding removed."""
    def score(pin: tuple[int, int]) -> tuple[int, int]:
        scale = min(pin[0] / height, pin[1] / width)
        kept = min(int(height * scale) * int(width * scale), height * width)
        return kept, -(pin[0] * pin[1] - kept)

    best = max(pinpoints, key=score)  # max keeps the first of equals, as the original does
    rows, cols = best[0] // tile * per_tile, best[1] // tile * per_tile
    if width / height > cols / rows:
        rows -= 2 * ((rows - int(height * cols / width)) // 2)
    elif width / height < cols / rows:
        cols -= 2 * ((cols - int(width * rows / height)) // 2)
    return rows, cols


def anyres_tokens(height: int, width: int) -> int:
    """LLaVA-NeXT's AnyRes: 24x24 features per 336-px tile, one newline token per row, plus the 576
    tokens of the 336-px base view."""
    rows, cols = anyres_grid(height, width, PINPOINTS, 336, 24)
    return 576 + rows * (cols + 1)


class TestLlavaNext(FamilyOracles):
    FAMILY = "llava_next"
    SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<image>", "<pad>"]
    TOKENIZER_ROLES = ("<s>", "</s>", "<pad>", True)
    # Mistral instruct: the answer follows " [/INST]" directly; no generation prompt of its own.
    FULL_RENDER = ("<<SYS>>\nYou are terse.\n<</SYS>>\n\n"
                   "[INST] <image>\nWhat is this? [/INST] An astronaut.</s>"
                   "[INST] <image>\nAnd this? [/INST] A palace.</s>")
    GENERATION_PROMPT = ""
    ASSISTANT_TEXT = " An astronaut.</s> A palace.</s>"
    TEXT_ONLY_RENDER = "[INST] Hi [/INST] Hello.</s>[INST] a b [/INST]"
    MAX_TOKENS = 8192

    def expected_image_tokens(self, image) -> int:
        return anyres_tokens(image.size[1], image.size[0])

    def check_geometry(self, config, processor) -> None:
        assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
        assert (config.vision_feature_select_strategy, config.vision_feature_layer) == ("default", -2)
        assert config.image_grid_pinpoints == [list(p) for p in PINPOINTS]
        assert config.text_config.model_type == "mistral" and config.text_config.sliding_window is None
        assert (processor.patch_size, processor.num_additional_image_tokens) == (14, 1)
        assert processor.image_processor.crop_size == {"height": 336, "width": 336}
        assert processor.image_processor.image_grid_pinpoints == [list(p) for p in PINPOINTS]

    def check_real_images(self, out, processor) -> None:
        # Both pick the 672x672 pinpoint: a base view and 4 tiles. The square astronaut keeps all 48x48
        # features; china (640x427) keeps 32 of 48 rows.
        assert anyres_tokens(512, 512) == 576 + 48 * 49 and anyres_tokens(427, 640) == 576 + 32 * 49
        assert out["pixel_values"].shape == (2, 5, 3, 336, 336)
        assert out["image_sizes"].tolist() == [[512, 512], [427, 640]]
