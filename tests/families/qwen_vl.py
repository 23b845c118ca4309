"""What the Qwen2-VL and Qwen2.5-VL tests share (Qwen3-VL keeps the format): the ChatML facts, the
image and video grids."""

from __future__ import annotations

import math

import numpy as np
import torch

from tests.families.oracles import FamilyOracles, VideoOracles, packed_video_positions


def grid(height: int, width: int) -> tuple[int, int]:
    """Patch grid from smart_resize with factor 28, min_pixels 56*56, max_pixels 28*28*1280 (Qwen2.5-VL:
    14*14*4*16384, larger, so the same grid)."""
    h, w = round(height / 28) * 28, round(width / 28) * 28
    assert 56 * 56 <= h * w <= 28 * 28 * 1280  # the test images need no rescaling
    return h // 14, w // 14


def video_tokens(frames: int, height: int, width: int) -> int:
    """Video tokens of Qwen2-VL and Qwen2.5-VL: 2 frames a temporal patch (the last frame repeated to fill
    one), every frame resized by smart_resize with factor 28 between the video pixel limits (min
    128*28*28, max 768*28*28 per frame; the per-frame cap of a 128000-token video budget does not bind
    here), 2x2 patches of 14 px merged into a token."""
    low, high = 128 * 28 * 28, 768 * 28 * 28
    h, w = round(height / 28) * 28, round(width / 28) * 28
    if h * w > high:
        beta = math.sqrt(height * width / high)
        h, w = max(28, math.floor(height / beta / 28) * 28), max(28, math.floor(width / beta / 28) * 28)
    elif h * w < low:
        beta = math.sqrt(low / (height * width))
        h, w = math.ceil(height * beta / 28) * 28, math.ceil(width * beta / 28) * 28
    return math.ceil(frames / 2) * (h // 14) * (w // 14) // 4


class QwenVLFacts(VideoOracles, FamilyOracles):
    """What Qwen2-VL and Qwen2.5-VL share: the ChatML format, the tokens, the image grid, the video grid."""

    SPECIAL_TOKENS = [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    TOKENIZER_ROLES = (None, "<|im_end|>", "<|endoftext|>", False)
    FULL_RENDER = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is this?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\nAn astronaut.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>And this?<|im_end|>\n"
        "<|im_start|>assistant\nA palace.<|im_end|>\n"
    )
    GENERATION_PROMPT = "<|im_start|>assistant\n"
    ASSISTANT_TEXT = "An astronaut.<|im_end|>A palace.<|im_end|>"
    # No system message: the default system prompt.
    TEXT_ONLY_RENDER = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    )

    def expected_image_tokens(self, image) -> int:
        gh, gw = grid(image.size[1], image.size[0])
        return gh * gw // 4

    def check_real_images(self, out, processor) -> None:
        assert out["image_grid_thw"].tolist() == [[1, 36, 36], [1, 30, 46]]

    def expected_video_tokens(self, frames: int, height: int, width: int) -> int:
        return video_tokens(frames, height, width)

    def test_packed_video_positions_are_the_models_rope(self, path) -> None:
        """The carphone clip at 6 of its 120 frames (29.97 fps): 3 temporal patches of 22x26 patches."""
        adapter, r, positions, ref = packed_video_positions(path)
        assert ref["video_grid_thw"].tolist() == [[3, 22, 26]]
        video_t = positions[1, r.input_ids == adapter.config.video_token_id].unique()
        assert len(video_t) == 3
        self.check_video_time(video_t - video_t[0], ref)

    def check_video_time(self, steps: torch.Tensor, ref) -> None:
        assert steps.tolist() == [0, 1, 2]  # Qwen2-VL: one rope step per temporal patch

    def test_vision_ids_are_numbered_on_request(self, path) -> None:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        media = [
            {"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "?"}]}
        ]
        assert proc.apply_chat_template(media, add_vision_id=True) == (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "Video 1: <|vision_start|><|video_pad|><|vision_end|>"
            "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
            "?<|im_end|>\n"
        )

    def test_video_through_processor_and_model(self, path, images) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        proc, model = AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)
        frame = np.asarray(images[0].resize((112, 112)))
        video = np.stack([frame, frame[::-1], frame[:, ::-1], frame])  # 4 frames -> 2 temporal patches
        messages = [
            {
                "role": "user",
                "content": [{"type": "video", "video": video}, {"type": "text", "text": "What?"}],
            },
            {"role": "assistant", "content": "Nothing."},
        ]
        out = proc.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
        grid_thw = out["video_grid_thw"]
        assert grid_thw[0, 0] == 2
        assert int((out["input_ids"] == model.config.video_token_id).sum()) == int(grid_thw.prod()) // 4
        with torch.no_grad():
            loss = model(**out, labels=out["input_ids"]).loss
        assert torch.isfinite(loss)
