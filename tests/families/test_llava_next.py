"""llava-hf/llava-v1.6-mistral-7b-hf: Mistral instruct turns, AnyRes views of 336 px."""

from __future__ import annotations

from tests.families.llava_facts import PINPOINTS, anyres_tokens, check_anyres_views
from tests.families.oracles import FamilyOracles


class TestLlavaNext(FamilyOracles):
    FAMILY = "llava_next"
    SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<image>", "<pad>"]
    TOKENIZER_ROLES = ("<s>", "</s>", "<pad>", True)
    # Mistral instruct: the answer follows " [/INST]" directly; no generation prompt of its own.
    FULL_RENDER = (
        "<<SYS>>\nYou are terse.\n<</SYS>>\n\n"
        "[INST] <image>\nWhat is this? [/INST] An astronaut.</s>"
        "[INST] <image>\nAnd this? [/INST] A palace.</s>"
    )
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
        check_anyres_views(out)
