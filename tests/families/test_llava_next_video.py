"""llava-hf/LLaVA-NeXT-Video-7B-hf: vicuna_v1 turns, LLaVA-NeXT's AnyRes 336-px views for images, 336-px
video frames average-pooled to 12x12 = 144 tokens each."""

from __future__ import annotations

import numpy as np
import torch

from tests.families.oracles import FamilyOracles
from tests.families.test_llava_next import PINPOINTS, anyres_tokens  # the same image geometry


class TestLlavaNextVideo(FamilyOracles):
    FAMILY = "llava_next_video"
    SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<video>", "<image>"]
    TOKENIZER_ROLES = ("<s>", "</s>", "<unk>", True)
    FULL_RENDER = ("You are terse. USER: <image>\nWhat is this? ASSISTANT: An astronaut.</s>"
                   "USER: <image>\nAnd this? ASSISTANT: A palace.</s>")
    GENERATION_PROMPT = "ASSISTANT:"
    ASSISTANT_TEXT = " An astronaut.</s> A palace.</s>"
    TEXT_ONLY_RENDER = "USER: Hi ASSISTANT: Hello.</s>USER: a b ASSISTANT:"
    MAX_TOKENS = 8192

    def expected_image_tokens(self, image) -> int:
        return anyres_tokens(image.size[1], image.size[0])

    def check_geometry(self, config, processor) -> None:
        assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
        assert (config.vision_feature_select_strategy, config.vision_feature_layer) == ("default", -2)
        assert config.image_grid_pinpoints == [list(p) for p in PINPOINTS]
        assert (config.spatial_pool_mode, config.spatial_pool_stride) == ("average", 2)
        text = config.text_config
        assert text.model_type == "llama" and text.max_position_embeddings == 4096
        assert (text.rope_parameters["rope_type"], text.rope_parameters["factor"]) == ("linear", 2.5)
        tok = processor.tokenizer
        assert config.video_token_id == tok.convert_tokens_to_ids("<video>") == config.image_token_id - 1
        assert text.pad_token_id == tok.convert_tokens_to_ids("<unk>") == 0
        assert (processor.patch_size, processor.num_additional_image_tokens) == (14, 1)
        assert processor.vision_feature_select_strategy == "default"
        assert processor.image_processor.image_grid_pinpoints == [list(p) for p in PINPOINTS]
        for proc in (processor.image_processor, processor.video_processor):
            assert proc.size["shortest_edge"] == 336
            assert (proc.crop_size["height"], proc.crop_size["width"]) == (336, 336)
        assert processor.video_processor.num_frames == 32

    def check_real_images(self, out, processor) -> None:
        # Both pick the 672x672 pinpoint: a base view and 4 tiles each.
        assert out["pixel_values"].shape == (2, 5, 3, 336, 336)
        assert out["image_sizes"].tolist() == [[512, 512], [427, 640]]

    def test_video_keeps_the_real_frame_geometry(self, path, images) -> None:
        # Not trained yet (a later issue): 336-px frames, 24x24 CLIP features pooled 2x2 to 12x12 = 144 tokens.
        from transformers import AutoModelForImageTextToText, AutoProcessor

        proc, model = AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)
        frame = np.asarray(images[1])
        messages = [{"role": "user", "content": [{"type": "text", "text": "What?"},
                                                 {"type": "video", "video": np.stack([frame] * 4)},
                                                 {"type": "image", "image": images[0]}]},
                    {"role": "assistant", "content": "Nothing."}]
        assert proc.apply_chat_template(messages) == "USER: <image>\n<video>\nWhat? ASSISTANT: Nothing.</s>"
        out = proc.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
        assert out["pixel_values_videos"].shape == (1, 4, 3, 336, 336)
        assert int((out["input_ids"] == model.config.video_token_id).sum()) == 4 * 12 * 12
        with torch.no_grad():
            assert torch.isfinite(model(**out, labels=out["input_ids"]).loss)
