"""llava-hf/llava-onevision-qwen2-7b-ov-hf: ChatML turns, SigLIP-384 views of 27x27 = 729 tokens; an image
alone gets AnyRes-max-9 tiles, the images of a multi-image sample their base view and a newline each."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_tools.sample import ImagePart, Sample, TextPart, Turn
from tests.families.llava_facts import anyres_grid
from tests.families.oracles import FamilyOracles, VideoOracles, video_members, video_sample
from tests.support.samples import PHOTOS
from trainer.data.packing import collate
from trainer.data.render import RenderError, render_sample, to_messages

PINPOINTS = [(384 * rows, 384 * cols) for rows in range(1, 7) for cols in range(1, 7)]
BASE = 27 * 27  # SigLIP so400m/14 at 384 px, no CLS token ("full" feature selection)


def alone_tokens(height: int, width: int) -> int:
    """An image alone, as the original LLaVA-OneVision code shows it: LLaVA-NeXT's AnyRes grid with 27x27
    features per 384-px tile, shrunk by `ratio` when it holds more than 1.1 times 9 tiles' features
    (anyres_max_9), one newline per row, plus the base view."""
    rows, cols = anyres_grid(height, width, PINPOINTS, 384, 27)
    ratio = math.sqrt(rows * cols / (9 * BASE))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return BASE + rows * (cols + 1)


def part(p: str):
    if p.endswith((".jpg", ".png")):
        return ImagePart(member=p, width=0, height=0, format="", bytes=0)
    return TextPart(text=p)


def sample(key: str, *turns: tuple[str, list[str]]) -> Sample:
    return Sample(
        key=key, source="s", index=0, turns=[Turn(role=r, parts=[part(p) for p in ps]) for r, ps in turns]
    )


# Two images in different user turns: one sample, so both are shown without tiles.
FIRST_TURN = [("user", ["img0.jpg", "Where?"]), ("assistant", ["China."])]
TWO_TURNS = sample("2", *FIRST_TURN, ("user", ["And this one?", "img1.png"]), ("assistant", ["Coffee."]))


class TestLlavaOnevision(VideoOracles, FamilyOracles):
    FAMILY = "llava_onevision"
    SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    TOKENIZER_ROLES = (None, "<|im_end|>", "<|endoftext|>", False)
    # llava-hf's template: no default system prompt; a message's images first, "<image>\n" each.
    FULL_RENDER = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\nAn astronaut.<|im_end|>\n"
        "<|im_start|>user\n<image>\nAnd this?<|im_end|>\n"
        "<|im_start|>assistant\nA palace.<|im_end|>\n"
    )
    GENERATION_PROMPT = "<|im_start|>assistant\n"
    ASSISTANT_TEXT = "An astronaut.<|im_end|>A palace.<|im_end|>"
    TEXT_ONLY_RENDER = (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    )
    MAX_TOKENS = 8192
    MIXED_FRAME_COUNTS = False  # one video per row of pixel_values_videos, a newline after each row

    def expected_image_tokens(self, image) -> int:
        return BASE + 1  # conversation() holds two images: each its base view plus one newline

    def check_geometry(self, config, processor) -> None:
        vision = config.vision_config
        assert (vision.model_type, vision.image_size, vision.patch_size) == ("siglip_vision_model", 384, 14)
        assert not vision.vision_use_head
        assert (config.vision_feature_select_strategy, config.vision_feature_layer) == ("full", -1)
        assert config.vision_aspect_ratio == "anyres_max_9"
        assert config.image_grid_pinpoints == [list(p) for p in PINPOINTS]
        assert config.text_config.model_type == "qwen2" and not config.tie_word_embeddings
        assert config.text_config.rope_parameters["rope_theta"] == 1000000.0
        assert (processor.num_image_tokens, processor.vision_feature_select_strategy) == (BASE, "full")
        assert processor.vision_aspect_ratio == "anyres_max_9"
        images, videos = processor.image_processor, processor.video_processor
        assert images.image_grid_pinpoints == [list(p) for p in PINPOINTS]
        for proc in (images, videos):
            assert (proc.size["height"], proc.size["width"]) == (384, 384)
            assert list(proc.image_mean) == list(proc.image_std) == [0.5, 0.5, 0.5]  # SigLIP's, not CLIP's
        assert videos.num_frames == 32

    def check_real_images(self, out, processor) -> None:
        assert out["pixel_values"].shape == (2, 1, 3, 384, 384)
        assert out["image_sizes"].tolist() == [[512, 512], [427, 640]]
        assert out["batch_num_images"].tolist() == [2]

    def test_an_image_alone_gets_anyres_max_9_tiles(self, path, images) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        # Both photos pick the 768x768 grid (2x2 tiles, 54x54 features); china keeps 36 of 54 rows.
        assert alone_tokens(512, 512) == BASE + 54 * 55 and alone_tokens(427, 640) == BASE + 36 * 55
        # A 6x6 grid (162x162 features) is shrunk by 2 to 81x81; a 300x1900 strip takes 1x5 tiles and keeps 21
        # of 27 rows; a 1000x333 column takes 3x1 tiles and keeps all 27 columns.
        assert alone_tokens(2304, 2304) == BASE + 81 * 82
        assert alone_tokens(300, 1900) == BASE + 21 * 136 and alone_tokens(1000, 333) == BASE + 81 * 28
        proc, model = AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)
        image_id = model.config.image_token_id
        grey = [Image.new("RGB", (w, h), (90, 120, 150)) for h, w in ((2304, 2304), (300, 1900), (1000, 333))]
        for image in (*images, *grey):
            content = [{"type": "image", "image": image}, {"type": "text", "text": "?"}]
            messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "Yes."}]
            out = proc.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
            assert int((out["input_ids"] == image_id).sum()) == alone_tokens(image.size[1], image.size[0]), (
                image.size
            )
            assert out["batch_num_images"].tolist() == [1] and out["pixel_values"].shape[1] > 1
            with torch.no_grad():  # the model unpads and shrinks its features to the same count, or raises
                assert torch.isfinite(model(**out, labels=out["input_ids"]).loss)

    def test_a_sample_is_rendered_as_inference_renders_the_whole_conversation(self, path) -> None:
        # With one image so far the processor shows it with tiles; once a second follows, both lose them.
        # The turns' prompts cannot all match inference: mmloom matches the whole conversation's.
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        r = render_sample(adapter, TWO_TURNS, PHOTOS)
        messages = to_messages(TWO_TURNS)
        photos = [Image.open(io.BytesIO(PHOTOS[m])).convert("RGB") for m in ("img0.jpg", "img1.png")]
        whole = adapter.processor.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"images": photos},
        )
        assert torch.equal(r.input_ids, whole["input_ids"][0])
        assert r.media.keys() == {"pixel_values", "image_sizes", "batch_num_images"}
        assert all(torch.equal(r.media[k], whole[k]) for k in r.media)
        assert r.media["batch_num_images"].tolist() == [2] and r.media["pixel_values"].shape[:2] == (2, 1)
        first = adapter.processor.apply_chat_template(
            messages[:1],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"images": photos[:1]},
        )
        image_id = adapter.processor.image_token_id
        assert int((first["input_ids"] == image_id).sum()) == alone_tokens(427, 640)
        assert int((r.input_ids == image_id).sum()) == 2 * (BASE + 1)

    def test_packs_mix_images_alone_and_multi_image_samples(self, path) -> None:
        from transformers import AutoModelForImageTextToText

        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        alone = sample("1", ("user", ["img0.jpg", "What is it?"]), ("assistant", ["A roof."]))
        text = sample("3", ("user", ["Hello"]), ("assistant", ["Hi."]))
        rendered = [render_sample(adapter, s, PHOTOS) for s in (TWO_TURNS, text, alone)]
        pack = collate(adapter, rendered).inputs
        assert pack["batch_num_images"].tolist() == [2, 1]
        assert pack["pixel_values"].shape == (3, 5, 3, 384, 384)  # 1 + 1 views, then 5, padded to 5
        assert pack["pixel_values"][:2, 1:].abs().sum() == 0
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sdpa"
        )
        model.eval()

        def summed(inputs: dict) -> torch.Tensor:
            labels = inputs.pop("labels")
            logits = model(**inputs, use_cache=False).logits[0]
            return F.cross_entropy(logits[:-1], labels[0, 1:], ignore_index=-100, reduction="sum")

        with torch.no_grad():
            one_by_one = sum(summed(dict(collate(adapter, [r]).inputs)) for r in rendered)
            packed = summed(dict(pack))
        assert abs(packed.item() - one_by_one.item()) <= 1e-6 * abs(one_by_one.item())

    def test_trimming_a_multi_image_sample_renders_the_shorter_one(self, path) -> None:
        # The image left alone gets tiles: the trimmed sample is rendered anew, and may need more tokens.
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        strip = io.BytesIO()
        Image.new("RGB", (384, 40), (200, 30, 30)).save(strip, format="PNG")  # alone: 1x1 grid, 3 rows kept
        members = {**PHOTOS, "strip.png": strip.getvalue()}
        first = [("user", ["strip.png", "Where?"]), ("assistant", ["Here."])]
        long = sample("4", *first, ("user", ["img1.png", "And?"]), ("assistant", ["coffee " * 300]))
        full, shorter = (
            render_sample(adapter, long, members),
            render_sample(adapter, sample("4", *first), members),
        )
        assert alone_tokens(40, 384) == BASE + 3 * 28
        assert int((shorter.input_ids == adapter.processor.image_token_id).sum()) == alone_tokens(40, 384)
        assert shorter.length < full.length
        trimmed = render_sample(adapter, long, members, max_tokens=full.length - 1)
        assert trimmed.trimmed and torch.equal(trimmed.input_ids, shorter.input_ids)
        assert all(torch.equal(trimmed.media[k], shorter.media[k]) for k in shorter.media)
        assert trimmed.media["batch_num_images"].tolist() == [1]
        two_turns = render_sample(adapter, TWO_TURNS, PHOTOS)
        with pytest.raises(RenderError, match="too_long"):  # china alone needs more tokens than both did
            render_sample(adapter, TWO_TURNS, PHOTOS, max_tokens=two_turns.length - 1)

    def test_video_keeps_the_real_frame_geometry(self, path, images) -> None:
        # 384-px frames pooled 2x2 to 14x14 = 196 tokens, one newline per video.
        from transformers import AutoModelForImageTextToText, AutoProcessor

        proc, model = AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)
        frame = np.asarray(images[1])
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": np.stack([frame] * 4)},
                    {"type": "text", "text": "What?"},
                ],
            },
            {"role": "assistant", "content": "Nothing."},
        ]
        assert proc.apply_chat_template(messages) == (
            "<|im_start|>user\n<video>\nWhat?<|im_end|>\n<|im_start|>assistant\nNothing.<|im_end|>\n"
        )
        out = proc.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
        assert out["pixel_values_videos"].shape == (1, 4, 3, 384, 384)
        assert int((out["input_ids"] == model.config.video_token_id).sum()) == 4 * 14 * 14 + 1
        with torch.no_grad():
            assert torch.isfinite(model(**out, labels=out["input_ids"]).loss)

    def test_images_then_videos_then_text(self, path) -> None:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        parts = [
            {"type": "text", "text": "Compare "},
            {"type": "video"},
            {"type": "image"},
            {"type": "text", "text": "these."},
            {"type": "image"},
        ]
        mixed = [{"role": "user", "content": parts}]
        assert proc.apply_chat_template(mixed) == (
            "<|im_start|>user\n<image>\n<image>\n<video>\nCompare these.<|im_end|>\n"
        )

    def expected_video_tokens(self, frames: int, height: int, width: int) -> int:
        return frames * 14 * 14 + 1  # any frame: resized to 384x384, 27x27 features pooled to 14x14

    def test_videos_of_different_frame_counts_never_share_a_pack(self, path) -> None:
        """The model appends a newline to each row of [videos, frames, ...]: no single tensor holds a
        6-frame and a 4-frame video. The packer asks packs_with and puts them in different packs."""
        from trainer.data.packing import Packer
        from trainer.models.registry import get_adapter

        adapter, members = get_adapter(path), video_members()
        rendered = [
            render_sample(adapter, video_sample(k, n), members) for k, n in (("a", 6), ("b", 4), ("c", 6))
        ]
        assert [r.media["pixel_values_videos"].shape[1] for r in rendered] == [6, 4, 6]
        assert adapter.packs_with(rendered[:1], rendered[2]) and not adapter.packs_with(
            rendered[:1], rendered[1]
        )
        with pytest.raises(ValueError, match="different frame counts"):
            collate(adapter, rendered[:2])
        packer = Packer(max_tokens=8192, buffer=3, compatible=adapter.packs_with)
        packs = [p for r in rendered for p in packer.add(r)] + list(packer.flush())
        assert sorted(sorted(r.key for r in p) for p in packs) == [["a", "c"], ["b"]]
        assert [collate(adapter, p).inputs["pixel_values_videos"].shape[:2] for p in packs] == [
            (2, 6),
            (1, 4),
        ]

    def test_the_vision_tower_stays_in_the_root_fsdp_unit(self, path) -> None:
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        assert adapter.fsdp_root_block("model.vision_tower.vision_model.encoder.layers")
        assert not adapter.fsdp_root_block("model.language_model.layers")
