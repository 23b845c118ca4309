"""llava-hf/llava-1.5-7b-hf: vicuna_v1 turns, CLIP ViT-L/14-336, 576 tokens per image."""

from __future__ import annotations

from tests.families.llava_facts import VicunaTurns
from tests.families.oracles import FamilyOracles


class TestLlava(VicunaTurns, FamilyOracles):
    FAMILY = "llava"
    SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<image>", "<pad>"]
    TOKENIZER_ROLES = ("<s>", "</s>", "<pad>", True)

    def expected_image_tokens(self, image) -> int:
        return (336 // 14) ** 2  # the CLS token is dropped by vision_feature_select_strategy="default"

    def check_geometry(self, config, processor) -> None:
        assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
        assert (config.vision_feature_select_strategy, config.vision_feature_layer) == ("default", -2)
        assert config.image_seq_length == 576
        assert (processor.patch_size, processor.num_additional_image_tokens) == (14, 1)
        assert processor.image_processor.crop_size == {"height": 336, "width": 336}

    def test_images_of_a_message_come_first(self, path) -> None:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        two_images = [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Compare."}, {"type": "image"}, {"type": "image"}],
            }
        ]
        assert proc.apply_chat_template(two_images) == "USER: <image>\n<image>\nCompare. "
