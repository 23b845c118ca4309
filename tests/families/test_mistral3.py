"""mistralai/Mistral-Small-3.1-24B-Instruct-2503: V7-tekken turns, Pixtral at native resolution (14-px
patches merged 2x2, longest edge up to 1540 px), a row of [IMG] per 28 px closed by [IMG_BREAK]/[IMG_END]."""

from __future__ import annotations

import datetime
import math

from tests.families.oracles import FamilyOracles


def token_grid(height: int, width: int) -> tuple[int, int]:
    """Rows and columns of [IMG] tokens: the image is scaled down (floored) so its longest edge is at most
    1540 px, then each edge is rounded up to a multiple of 28 px (patch 14 x spatial merge 2)."""
    ratio = max(height / 1540, width / 1540)
    if ratio > 1:
        height, width = math.floor(height / ratio), math.floor(width / ratio)
    return math.ceil(height / 28), math.ceil(width / 28)


def default_system() -> str:
    """The checkpoint's default system prompt, dated the day it is rendered."""
    return (
        "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup "
        "headquartered in Paris.\nYour knowledge base was last updated on 2023-10-01. The current date is "
        f"{datetime.date.today():%Y-%m-%d}.\n\nWhen you're not sure about some information, you say that you "
        "don't have the information and don't make up anything.\nIf the user's question is not clear, "
        "ambiguous, or does not provide enough context for you to accurately answer the question, you do not "
        'try to answer it right away and you rather ask the user to clarify their request (e.g. "What are '
        'some good restaurants around me?" => "Where are you?" or "When is the next flight to Tokyo" => '
        '"Where do you travel from?")'
    )


class TestMistral3(FamilyOracles):
    FAMILY = "mistral3"
    SPECIAL_TOKENS = [
        "<s>",
        "</s>",
        "<unk>",
        "<pad>",
        "[INST]",
        "[/INST]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
        "[IMG]",
        "[IMG_BREAK]",
        "[IMG_END]",
        "[TOOL_CALLS]",
    ]
    TOKENIZER_ROLES = ("<s>", "</s>", "<pad>", True)
    FULL_RENDER = (
        "<s>[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT]"
        "[INST]What is this?[IMG][/INST]An astronaut.</s>"
        "[INST][IMG]And this?[/INST]A palace.</s>"
    )
    GENERATION_PROMPT = ""  # the answer follows [/INST] directly
    ASSISTANT_TEXT = "An astronaut.</s>A palace.</s>"

    @property
    def TEXT_ONLY_RENDER(self) -> str:  # the oracle reads it per test: the date can change
        return f"<s>[SYSTEM_PROMPT]{default_system()}[/SYSTEM_PROMPT][INST]Hi[/INST]Hello.</s>[INST]ab[/INST]"

    def expected_image_tokens(self, image) -> int:
        rows, cols = token_grid(image.size[1], image.size[0])
        return rows * cols

    def check_geometry(self, config, processor) -> None:
        vision = config.vision_config
        assert (vision.model_type, vision.image_size, vision.patch_size) == ("pixtral", 1540, 14)
        assert vision.hidden_act == "silu" and vision.rope_parameters["rope_theta"] == 10000.0
        assert (config.spatial_merge_size, config.vision_feature_layer) == (2, -1)
        assert config.projector_hidden_act == "gelu" and not config.multimodal_projector_bias
        text = config.text_config
        assert text.model_type == "mistral" and text.sliding_window is None
        assert text.rope_parameters["rope_theta"] == 1e9
        assert not config.tie_word_embeddings
        assert (processor.patch_size, processor.spatial_merge_size) == (14, 2)
        assert processor.image_processor.size == {"longest_edge": 1540}
        assert processor.image_processor.patch_size == {"height": 14, "width": 14}
        # Tekken's control tokens keep their ids: <s> 1, </s> 2, [IMG] 10, <pad> 11, [IMG_BREAK] 12,
        # [IMG_END] 13.
        tok = processor.tokenizer
        assert config.image_token_id == 10
        assert [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [1, 2, 11]
        assert [processor.image_break_token_id, processor.image_end_token_id] == [12, 13]
        assert tok.convert_tokens_to_ids(["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]) == [
            3,
            4,
            17,
            18,
        ]

    def check_real_images(self, out, processor) -> None:
        # astronaut 512x512 -> 19x19 tokens (532 px); china 640x427 -> 16 rows x 23 columns (448 x 644 px).
        assert token_grid(512, 512) == (19, 19) and token_grid(427, 640) == (16, 23)
        assert out["image_sizes"].tolist() == [[532, 532], [448, 644]]
        # One processor call pads both to the largest height and width, with zeros.
        assert out["pixel_values"].shape == (2, 3, 532, 644)
        assert out["pixel_values"][1, :, 448:].abs().sum() == 0
        ids, tok = out["input_ids"][0], processor.tokenizer
        assert int((ids == tok.convert_tokens_to_ids("[IMG_BREAK]")).sum()) == 18 + 15
        assert int((ids == tok.convert_tokens_to_ids("[IMG_END]")).sum()) == 2

    def test_large_images_are_scaled_to_1540_px(self, path) -> None:
        from PIL import Image
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        wide = Image.new("RGB", (3000, 1000), (10, 20, 30))
        out = proc(text=["[IMG]"], images=[wide], return_tensors="pt")
        assert token_grid(1000, 3000) == (19, 55)
        assert out["image_sizes"].tolist() == [[19 * 28, 55 * 28]]
        assert int((out["input_ids"] == 10).sum()) == 19 * 55

    def test_images_of_different_sizes_pack_exactly(self, path) -> None:
        # A narrow crop (140x427 -> 5x16 tokens) and china (23x16): packed, the smaller image is zero-padded
        # to the larger's height and width as one processor call pads them, and the loss is still the
        # per-sample sum (the tower cuts each image back to its own size before attending within it).
        from tests.support.samples import SAMPLES, assert_packed_equals_alone, cropped_photo
        from trainer.data.packing import collate
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        narrow_sample, photos = cropped_photo((0, 0, 140, 427), "A strip.")
        rendered = [render_sample(adapter, s, photos) for s in (narrow_sample, SAMPLES[0])]
        assert [tuple(r.media["pixel_values"].shape[-2:]) for r in rendered] == [(448, 140), (448, 644)]
        pack = collate(adapter, rendered).inputs
        assert (
            pack["pixel_values"].shape == (2, 3, 448, 644)
            and pack["pixel_values"][0, :, :, 140:].abs().sum() == 0
        )
        assert pack["image_sizes"].tolist() == [[448, 140], [448, 644]]
        assert int((pack["input_ids"] == 10).sum()) == 16 * 5 + 16 * 23
        assert_packed_equals_alone(path, adapter, rendered, pack)
