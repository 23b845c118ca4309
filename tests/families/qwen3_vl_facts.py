"""What Qwen3-VL checkpoints share, for the test classes of qwen3_vl and qwen3_vl_moe: ChatML turns
without a default system prompt, 16-px patches merged 2x2, interleaved 3-D rope, DeepStack features;
packed positions are the model's own rope index."""

from __future__ import annotations

import math

import torch

from tests.families.oracles import CARPHONE, FamilyOracles, VideoOracles, packed_video_positions
from tests.families.qwen_vl import QwenVLFacts


def grid(height: int, width: int) -> tuple[int, int]:
    """Patch grid from smart_resize with factor 32 (16-px patches, 2x2 merge) and the published
    pixel limits, min 256*256 and max 4096*4096 (preprocessor_config.json: 65536 and 16777216)."""
    h, w = round(height / 32) * 32, round(width / 32) * 32
    assert 256 * 256 <= h * w <= 4096 * 4096  # the test images need no rescaling
    return h // 16, w // 16


def video_tokens(frames: int, height: int, width: int) -> int:
    """Video tokens of Qwen3-VL: 2 frames a temporal patch, the clip resized by its smart_resize with
    factor 32 over all its frames (published video limits: min 64*64, max 24*1024*1024 pixels, and
    per frame at most 768 tokens' worth, the qwen-vl-utils cap), 2x2 patches of 16 px merged into a token."""
    per_frame = max(min(768 * 32 * 32, 24 * 1024 * 1024 // frames), int(64 * 64 * 1.05))
    low, high = 64 * 64, per_frame * frames
    h, w, t = round(height / 32) * 32, round(width / 32) * 32, round(frames / 2) * 2
    if t * h * w > high:
        beta = math.sqrt(frames * height * width / high)
        h, w = max(32, math.floor(height / beta / 32) * 32), max(32, math.floor(width / beta / 32) * 32)
    elif t * h * w < low:
        beta = math.sqrt(low / (frames * height * width))
        h, w = math.ceil(height * beta / 32) * 32, math.ceil(width * beta / 32) * 32
    return math.ceil(frames / 2) * (h // 16) * (w // 16) // 4


class Qwen3VLFacts(VideoOracles, FamilyOracles):
    SPECIAL_TOKENS = [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<tool_call>",
        "<tool_response>",
        "<think>",
        "</think>",
    ]
    TOKENIZER_ROLES = (None, "<|im_end|>", "<|endoftext|>", False)
    # Qwen2-VL's ChatML when a system message is given.
    FULL_RENDER, GENERATION_PROMPT = QwenVLFacts.FULL_RENDER, QwenVLFacts.GENERATION_PROMPT
    ASSISTANT_TEXT = QwenVLFacts.ASSISTANT_TEXT
    # Unlike Qwen2-VL, no default system prompt.
    TEXT_ONLY_RENDER = (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    )

    def expected_image_tokens(self, image) -> int:
        gh, gw = grid(image.size[1], image.size[0])
        return gh * gw // 4

    def check_geometry(self, config, processor) -> None:
        vision, text = config.vision_config, config.text_config
        assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (16, 2, 2)
        assert vision.num_position_embeddings == 48 * 48
        assert vision.out_hidden_size == text.hidden_size
        # DeepStack levels come from intermediate blocks and reach fewer decoder layers than there are.
        assert vision.deepstack_visual_indexes and max(vision.deepstack_visual_indexes) < vision.depth - 1
        assert len(vision.deepstack_visual_indexes) < text.num_hidden_layers
        rope = text.rope_parameters
        assert rope["mrope_interleaved"] and rope["rope_theta"] == 5000000
        assert sum(rope["mrope_section"]) == text.head_dim // 2
        assert [s * 128 // text.head_dim for s in rope["mrope_section"]] == [
            24,
            20,
            20,
        ]  # the 8B's, head_dim 128
        assert type(processor).__name__ == "Qwen3VLProcessor"
        assert processor.image_processor.size == {"shortest_edge": 65536, "longest_edge": 16777216}
        assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
        assert processor.video_processor.size == {"shortest_edge": 4096, "longest_edge": 25165824}
        assert (processor.image_processor.merge_size, processor.video_processor.merge_size) == (2, 2)

    def check_real_images(self, out, processor) -> None:
        assert out["image_grid_thw"].tolist() == [[1, 32, 32], [1, 26, 40]]
        assert out["pixel_values"].shape == (32 * 32 + 26 * 40, 3 * 2 * 16 * 16)

    def test_vision_ids_are_numbered_on_request(self, path) -> None:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        media = [
            {"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "?"}]}
        ]
        assert proc.apply_chat_template(media, add_vision_id=True) == (
            "<|im_start|>user\nVideo 1: <|vision_start|><|video_pad|><|vision_end|>"
            "Picture 1: <|vision_start|><|image_pad|><|vision_end|>?<|im_end|>\n"
        )

    def test_system_images_are_dropped_and_only_a_leading_system_message_counts(self, path) -> None:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        messages = [
            {
                "role": "system",
                "content": [
                    {"type": "text", "text": "Be"},
                    {"type": "image"},
                    {"type": "text", "text": " brief."},
                ],
            },
            {"role": "user", "content": "Hi"},
            {"role": "system", "content": "ignored"},
        ]
        assert proc.apply_chat_template(messages) == (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        )

    def test_packed_positions_and_logits_are_the_models_own(self, path) -> None:
        """Two samples with images packed: the positions are, per sample, text positions restarting at 0
        over the model's own get_rope_index of what the processor gives at inference, and each sample's
        logits in the pack equal the model's on that sample alone, positions computed by the model."""
        from transformers import AutoModelForImageTextToText

        from tests.support.samples import PHOTOS, SAMPLES, images_of
        from trainer.data.packing import collate
        from trainer.data.render import render_sample, to_messages
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sdpa"
        )
        model.eval()
        samples = [SAMPLES[0], SAMPLES[2]]  # one image; two images and a system prompt
        rendered = [render_sample(adapter, s, PHOTOS) for s in samples]
        pack = collate(adapter, rendered).inputs
        assert pack["position_ids"].shape == (4, 1, sum(r.length for r in rendered))
        with torch.no_grad():
            packed = model(**{k: v for k, v in pack.items() if k != "labels"}, use_cache=False).logits[0]
        start = 0
        for sample, r in zip(samples, rendered):
            ref = adapter.processor.apply_chat_template(
                to_messages(sample),
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"images": images_of(sample)},
            )
            assert torch.equal(ref["input_ids"][0], r.input_ids)
            rope, _ = model.model.get_rope_index(
                ref["input_ids"], ref["mm_token_type_ids"], image_grid_thw=ref["image_grid_thw"]
            )
            positions = pack["position_ids"][:, 0, start : start + r.length]
            assert torch.equal(positions[0], torch.arange(r.length))
            assert torch.equal(positions[1:], rope[:, 0])
            assert positions[1:].max() < r.length - 1  # the image blocks are compressed
            with torch.no_grad():
                alone = model(**ref, use_cache=False).logits[0]
            assert torch.allclose(packed[start : start + r.length], alone, atol=1e-4, rtol=1e-4)
            start += r.length

    def expected_video_tokens(self, frames: int, height: int, width: int) -> int:
        return video_tokens(frames, height, width)

    def test_packed_video_positions_are_the_models_rope_and_timestamps_the_clips(self, path) -> None:
        """6 of the carphone clip's 120 frames (29.97 fps): 3 temporal patches, each its own vision block
        after "<t seconds>", t the mean time of its two frames in the video; time advances through that
        text, so every patch restarts the rope's temporal row at the text position."""
        from data_tools.video import VideoPolicy, decode_video

        adapter, r, _, ref = packed_video_positions(path)
        clip = decode_video(CARPHONE.read_bytes(), VideoPolicy(), 6)
        assert clip.indices == [0, 24, 48, 71, 95, 119]
        times = [(a + b) / 2 for a, b in zip(clip.timestamps[::2], clip.timestamps[1::2])]
        text = adapter.tokenizer.decode(r.input_ids)
        # Only the blocks, back to back: whether the chat template's own <|vision_start|>...<|vision_end|>
        # still wraps them is the installed processor's choice (5.25 dropped it), and the rendering
        # equals that processor's at inference token for token (packed_video_positions checks it).
        blocks = "".join(
            f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * 24 + "<|vision_end|>" for t in times
        )
        assert blocks in text
        assert text.count(" seconds>") == 3 and text.count("<|video_pad|>") == 3 * 24
        assert [f"{t:.1f}" for t in times] == ["0.4", "2.0", "3.6"]
        assert ref["video_grid_thw"].tolist() == [[3, 8, 12]]

    def test_a_one_frame_video_is_that_frame_twice(self, path, media) -> None:
        from data_tools.video import VideoPolicy
        from tests.families.oracles import video_sample
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        sample = video_sample("one", None)
        r = render_sample(
            adapter, sample, {"v.mp4": media["one_frame.mp4"].read_bytes()}, video=VideoPolicy()
        )
        assert r.media["video_grid_thw"][0, 0] == 1
        assert adapter.tokenizer.decode(r.input_ids).count("<0.0 seconds>") == 1
