"""llava-hf/LLaVA-NeXT-Video-7B-hf: vicuna_v1 turns, LLaVA-NeXT's AnyRes 336-px views for images, 336-px
video frames average-pooled to 12x12 = 144 tokens each."""

from __future__ import annotations

import numpy as np
import torch

from tests.families.llava_facts import PINPOINTS, VicunaTurns, anyres_tokens, check_anyres_views
from tests.families.oracles import FamilyOracles, VideoOracles, video_members, video_sample


class TestLlavaNextVideo(VicunaTurns, VideoOracles, FamilyOracles):
    FAMILY = "llava_next_video"
    SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<video>", "<image>"]
    TOKENIZER_ROLES = ("<s>", "</s>", "<unk>", True)
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
        check_anyres_views(out)  # LLaVA-NeXT's AnyRes views

    def test_video_keeps_the_real_frame_geometry(self, path, images) -> None:
        # 336-px frames, 24x24 CLIP features pooled 2x2 to 12x12 = 144 tokens, no newline.
        from transformers import AutoModelForImageTextToText, AutoProcessor

        proc, model = AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)
        frame = np.asarray(images[1])
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What?"},
                    {"type": "video", "video": np.stack([frame] * 4)},
                    {"type": "image", "image": images[0]},
                ],
            },
            {"role": "assistant", "content": "Nothing."},
        ]
        assert proc.apply_chat_template(messages) == "USER: <image>\n<video>\nWhat? ASSISTANT: Nothing.</s>"
        out = proc.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
        assert out["pixel_values_videos"].shape == (1, 4, 3, 336, 336)
        assert int((out["input_ids"] == model.config.video_token_id).sum()) == 4 * 12 * 12
        with torch.no_grad():
            assert torch.isfinite(model(**out, labels=out["input_ids"]).loss)

    def expected_video_tokens(self, frames: int, height: int, width: int) -> int:
        return frames * 12 * 12  # any frame: resized to 336 on its short side, center-cropped, pooled

    def test_videos_of_different_frame_counts_pack_frame_by_frame(self, path) -> None:
        """6 and 4 frames cannot share [videos, frames, ...]: packed, all 10 frames form one row, which
        the model encodes and pools frame by frame into the same 10 x 144 features, in order."""
        from transformers import AutoModelForImageTextToText

        from trainer.data.packing import collate
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        adapter, members = get_adapter(path), video_members()
        rendered = [
            render_sample(adapter, video_sample(k, n), members) for k, n in (("a", 6), ("b", 4), ("c", 4))
        ]
        assert [tuple(r.media["pixel_values_videos"].shape[:2]) for r in rendered] == [(1, 6), (1, 4), (1, 4)]
        assert collate(adapter, rendered[1:]).inputs["pixel_values_videos"].shape[:2] == (2, 4)
        pack = collate(adapter, rendered[:2]).inputs
        assert pack["pixel_values_videos"].shape[:2] == (1, 10)
        assert torch.equal(pack["pixel_values_videos"][0, 6:], rendered[1].media["pixel_values_videos"][0])
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        with torch.no_grad():
            row = model.model.get_video_features(pack["pixel_values_videos"]).pooler_output
            apart = [
                model.model.get_video_features(r.media["pixel_values_videos"]).pooler_output
                for r in rendered[:2]
            ]
        assert row.shape[:2] == (1, 10 * 144)
        assert torch.allclose(row[0], torch.cat([a[0] for a in apart]), atol=1e-6)

    def test_the_vision_tower_stays_in_the_root_fsdp_unit(self, path) -> None:
        # Images and videos are two calls of the tower: per-block FSDP units would be gathered once on a
        # rank whose pack holds one kind and twice on one whose pack holds both.
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        assert adapter.fsdp_root_block("model.vision_tower.vision_model.encoder.layers")
        assert not adapter.fsdp_root_block("model.language_model.layers")
