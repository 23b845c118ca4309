"""Tiny checkpoints (trainer/models/tiny.py): real token geometry, real chat formats, loadable offline.

The expected numbers below are worked out from the real checkpoints' configs, not read back from
tiny.py, so a wrong geometry or template fails here.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.models.tiny import FAMILIES, build_tiny, main

FAMILY_NAMES = ["llava", "qwen2_vl", "idefics3", "qwen2_5_vl", "llava_next"]


def _data_dir(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} missing: pip install -e .[dev]"
    return Path(spec.submodule_search_locations[0], *parts)


ASTRONAUT = _data_dir("skimage", "data") / "astronaut.png"      # 512 x 512
CHINA = _data_dir("sklearn", "datasets", "images") / "china.jpg"  # 640 wide x 427 high

SPECIAL_TOKENS = {
    "llava": ["<s>", "</s>", "<unk>", "<image>", "<pad>"],
    "qwen2_vl": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"],
    "idefics3": ["<|begin_of_text|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                 "<global-img>", "<row_1_col_1>", "<row_4_col_3>", "<row_6_col_6>"],
    "qwen2_5_vl": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>", "<|fim_prefix|>", "<|file_sep|>"],
    "llava_next": ["<s>", "</s>", "<unk>", "<image>", "<pad>"],
}
# (bos, eos, pad, whether plain tokenization prepends bos), as in the real tokenizers.
TOKENIZER_ROLES = {
    "llava": ("<s>", "</s>", "<pad>", True),
    "qwen2_vl": (None, "<|im_end|>", "<|endoftext|>", False),
    "idefics3": ("<|begin_of_text|>", "<end_of_utterance>", "<|reserved_special_token_0|>", True),
    "qwen2_5_vl": (None, "<|im_end|>", "<|endoftext|>", False),
    "llava_next": ("<s>", "</s>", "<pad>", True),
}

# A system prompt, two turns, two images: the image after the text in turn 1 and before it in turn 2.
FULL_RENDER = {
    "llava": "You are terse. USER: <image>\nWhat is this? ASSISTANT: An astronaut.</s>"
             "USER: <image>\nAnd this? ASSISTANT: A palace.</s>",
    "qwen2_vl": "<|im_start|>system\nYou are terse.<|im_end|>\n"
                "<|im_start|>user\nWhat is this?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
                "<|im_start|>assistant\nAn astronaut.<|im_end|>\n"
                "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>And this?<|im_end|>\n"
                "<|im_start|>assistant\nA palace.<|im_end|>\n",
    "idefics3": "<|begin_of_text|>System: You are terse.<end_of_utterance>\n"
                "User: What is this?<image><end_of_utterance>\n"
                "Assistant: An astronaut.<end_of_utterance>\n"
                "User:<image>And this?<end_of_utterance>\n"
                "Assistant: A palace.<end_of_utterance>\n",
    "qwen2_5_vl": "<|im_start|>system\nYou are terse.<|im_end|>\n"
                  "<|im_start|>user\nWhat is this?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
                  "<|im_start|>assistant\nAn astronaut.<|im_end|>\n"
                  "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>And this?<|im_end|>\n"
                  "<|im_start|>assistant\nA palace.<|im_end|>\n",
    # Mistral instruct: the answer follows " [/INST]" directly; no generation prompt of its own.
    "llava_next": "<<SYS>>\nYou are terse.\n<</SYS>>\n\n"
                  "[INST] <image>\nWhat is this? [/INST] An astronaut.</s>"
                  "[INST] <image>\nAnd this? [/INST] A palace.</s>",
}
GENERATION_PROMPT = {"llava": "ASSISTANT:", "qwen2_vl": "<|im_start|>assistant\n", "idefics3": "Assistant:",
                     "qwen2_5_vl": "<|im_start|>assistant\n", "llava_next": ""}
# What the model is trained to produce (return_assistant_tokens_mask): answers plus end-of-turn tokens.
ASSISTANT_TEXT = {
    "llava": " An astronaut.</s> A palace.</s>",
    "qwen2_vl": "An astronaut.<|im_end|>A palace.<|im_end|>",
    "idefics3": " An astronaut.<end_of_utterance> A palace.<end_of_utterance>",
    "qwen2_5_vl": "An astronaut.<|im_end|>A palace.<|im_end|>",
    "llava_next": " An astronaut.</s> A palace.</s>",
}


def _idefics3_tiles(height: int, width: int) -> tuple[int, int]:
    """Rows and columns of 364-px tiles: longest edge resized to 4 * 364 (other edge rounded up to even),
    then both edges rounded up to multiples of 364, as the real preprocessor does."""
    if width >= height:
        height, width = int(1456 / (width / height)), 1456
        height += height % 2
    else:
        height, width = 1456, int(1456 * (width / height))
        width += width % 2
    return math.ceil(height / 364), math.ceil(width / 364)


def _qwen2_vl_grid(height: int, width: int) -> tuple[int, int]:
    """Patch grid from smart_resize with factor 28, min_pixels 56*56, max_pixels 28*28*1280 (Qwen2.5-VL:
    14*14*4*16384, larger, so the same grid)."""
    h, w = round(height / 28) * 28, round(width / 28) * 28
    assert 56 * 56 <= h * w <= 28 * 28 * 1280  # the test images need no rescaling
    return h // 14, w // 14


LLAVA_NEXT_PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


def _llava_next_tokens(height: int, width: int) -> int:
    """AnyRes as the original LLaVA-NeXT code does it: the pinpoint that keeps the most pixels (then
    wastes the least), 24x24 features per 336-px tile, rows (or columns) of pure padding removed, one
    newline token per row, plus the 576 tokens of the 336-px base view."""
    def score(pin: tuple[int, int]) -> tuple[int, int]:
        scale = min(pin[0] / height, pin[1] / width)
        kept = min(int(height * scale) * int(width * scale), height * width)
        return kept, -(pin[0] * pin[1] - kept)

    best = max(LLAVA_NEXT_PINPOINTS, key=score)  # max keeps the first of equals, as the original does
    rows, cols = best[0] // 336 * 24, best[1] // 336 * 24
    if width / height > cols / rows:
        rows -= 2 * ((rows - int(height * cols / width)) // 2)
    elif width / height < cols / rows:
        cols -= 2 * ((cols - int(width * rows / height)) // 2)
    return 576 + rows * (cols + 1)


def expected_image_tokens(family: str, image: Image.Image) -> int:
    width, height = image.size
    if family == "llava":
        return (336 // 14) ** 2  # CLS dropped by vision_feature_select_strategy="default"
    if family in ("qwen2_vl", "qwen2_5_vl"):
        gh, gw = _qwen2_vl_grid(height, width)
        return gh * gw // 4
    if family == "llava_next":
        return _llava_next_tokens(height, width)
    rows, cols = _idefics3_tiles(height, width)
    return (rows * cols + 1) * 169  # tiles plus the global image, 169 = (364 / 14) ** 2 / 2 ** 2


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {family: build_tiny(family, tmp_path_factory.mktemp(family)) for family in FAMILY_NAMES}


@pytest.fixture(scope="module")
def images() -> tuple[Image.Image, Image.Image]:
    return Image.open(ASTRONAUT).convert("RGB"), Image.open(CHINA).convert("RGB")


def _load(path: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)


def _conversation(first=None, second=None) -> list[dict]:
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image", **first}]},
        {"role": "assistant", "content": [{"type": "text", "text": "An astronaut."}]},
        {"role": "user", "content": [{"type": "image", **second}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A palace."}]},
    ]


def test_families_are_the_three_of_the_issue() -> None:
    assert sorted(FAMILIES) == sorted(FAMILY_NAMES)
    with pytest.raises(ValueError, match="unknown family 'gpt2'"):
        build_tiny("gpt2", "/nonexistent")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_special_tokens_are_single_ids(family: str, built: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built[family])
    for token in SPECIAL_TOKENS[family]:
        token_id = tok.convert_tokens_to_ids(token)
        assert token_id is not None and (token == tok.unk_token or token_id != tok.unk_token_id), token
        assert tok.encode(token, add_special_tokens=False) == [token_id], token
        # Also inside text, without spaces around it.
        ids = tok.encode(f"ab{token}cd", add_special_tokens=False)
        assert ids.count(token_id) == 1 and len(ids) >= 3, token
        assert tok.decode(ids) == f"ab{token}cd"
    bos, eos, pad, adds_bos = TOKENIZER_ROLES[family]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (bos, eos, pad)
    ids = tok("hello")["input_ids"]
    assert (ids[0] == tok.bos_token_id) is adds_bos and ids.count(tok.bos_token_id) == int(adds_bos)


def test_geometry_is_the_real_models(built: dict[str, Path]) -> None:
    from transformers import AutoConfig, AutoProcessor

    llava = AutoConfig.from_pretrained(built["llava"])
    assert (llava.vision_config.image_size, llava.vision_config.patch_size) == (336, 14)
    assert (llava.vision_feature_select_strategy, llava.vision_feature_layer) == ("default", -2)
    assert llava.image_seq_length == 576
    proc = AutoProcessor.from_pretrained(built["llava"])
    assert (proc.patch_size, proc.num_additional_image_tokens) == (14, 1)
    assert proc.image_processor.crop_size == {"height": 336, "width": 336}

    qwen = AutoConfig.from_pretrained(built["qwen2_vl"])
    vision = qwen.vision_config
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    head_dim = qwen.text_config.hidden_size // qwen.text_config.num_attention_heads
    sections = qwen.text_config.rope_parameters["mrope_section"]
    assert sum(sections) == head_dim // 2
    assert [s * 8 for s in sections] == [16, 24, 24]  # the 2B model's sections for head_dim 128, scaled
    proc = AutoProcessor.from_pretrained(built["qwen2_vl"])
    assert proc.image_processor.size["shortest_edge"] == 56 * 56
    assert proc.image_processor.size["longest_edge"] == 28 * 28 * 1280
    assert (proc.image_processor.merge_size, proc.video_processor.merge_size) == (2, 2)

    idefics = AutoConfig.from_pretrained(built["idefics3"])
    assert (idefics.vision_config.image_size, idefics.vision_config.patch_size) == (364, 14)
    assert idefics.scale_factor == 2
    proc = AutoProcessor.from_pretrained(built["idefics3"])
    assert proc.image_seq_len == 169
    assert proc.image_processor.size["longest_edge"] == 4 * 364
    assert proc.image_processor.max_image_size == {"longest_edge": 364}
    assert proc.image_processor.do_image_splitting

    qwen25 = AutoConfig.from_pretrained(built["qwen2_5_vl"])
    vision = qwen25.vision_config
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert (vision.window_size, vision.tokens_per_second) == (112, 2)
    assert vision.fullatt_block_indexes == [vision.depth - 1]  # windowed blocks, then a full-attention one
    assert vision.out_hidden_size == qwen25.text_config.hidden_size
    head_dim = qwen25.text_config.hidden_size // qwen25.text_config.num_attention_heads
    assert [s * 8 for s in qwen25.text_config.rope_parameters["mrope_section"]] == [16, 24, 24]
    assert sum(qwen25.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    proc = AutoProcessor.from_pretrained(built["qwen2_5_vl"])
    assert type(proc).__name__ == "Qwen2_5_VLProcessor"
    assert proc.image_processor.size == {"shortest_edge": 3136, "longest_edge": 12845056}
    assert (proc.image_processor.merge_size, proc.video_processor.merge_size) == (2, 2)

    nxt = AutoConfig.from_pretrained(built["llava_next"])
    assert (nxt.vision_config.image_size, nxt.vision_config.patch_size) == (336, 14)
    assert (nxt.vision_feature_select_strategy, nxt.vision_feature_layer) == ("default", -2)
    assert nxt.image_grid_pinpoints == [list(p) for p in LLAVA_NEXT_PINPOINTS]
    assert nxt.text_config.model_type == "mistral" and nxt.text_config.sliding_window is None
    proc = AutoProcessor.from_pretrained(built["llava_next"])
    assert (proc.patch_size, proc.num_additional_image_tokens) == (14, 1)
    assert proc.image_processor.crop_size == {"height": 336, "width": 336}
    assert proc.image_processor.image_grid_pinpoints == [list(p) for p in LLAVA_NEXT_PINPOINTS]

    for path in built.values():
        config = AutoConfig.from_pretrained(path)
        assert config.text_config.hidden_size <= 64 and config.text_config.num_hidden_layers <= 2
        assert (path / "model.safetensors").stat().st_size < 5 * 2**20


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_chat_template_format_and_prefixes(family: str, built: dict[str, Path]) -> None:
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(built[family])
    messages = _conversation({}, {})
    full = proc.apply_chat_template(messages)
    assert full == FULL_RENDER[family]
    for k in range(1, len(messages) + 1):
        head = proc.apply_chat_template(messages[:k])
        assert full.startswith(head), k
        if k < len(messages) and messages[k]["role"] == "assistant":
            prompt = proc.apply_chat_template(messages[:k], add_generation_prompt=True)
            assert prompt == head + GENERATION_PROMPT[family]
            assert proc.apply_chat_template(messages[: k + 1]).startswith(prompt)
            assert full.startswith(prompt)


def test_chat_template_variants(built: dict[str, Path]) -> None:
    from transformers import AutoProcessor

    text_only = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                 {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    expected = {
        "llava": "USER: Hi ASSISTANT: Hello.</s>USER: a b ASSISTANT:",
        # No system message: Qwen2-VL's default system prompt.
        "qwen2_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
                    "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n",
        "idefics3": "<|begin_of_text|>User: Hi<end_of_utterance>\nAssistant: Hello.<end_of_utterance>\n"
                    "User: ab<end_of_utterance>\nAssistant:",
        "qwen2_5_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
                      "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n",
        "llava_next": "[INST] Hi [/INST] Hello.</s>[INST] a b [/INST]",
    }
    for family, text in expected.items():
        proc = AutoProcessor.from_pretrained(built[family])
        assert proc.apply_chat_template(text_only, add_generation_prompt=True) == text, family

    proc = AutoProcessor.from_pretrained(built["llava"])
    two_images = [{"role": "user", "content": [{"type": "text", "text": "Compare."}, {"type": "image"},
                                               {"type": "image"}]}]
    assert proc.apply_chat_template(two_images) == "USER: <image>\n<image>\nCompare. "

    proc = AutoProcessor.from_pretrained(built["qwen2_vl"])
    parts = [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "?"}]
    media = [{"role": "user", "content": parts}]
    assert proc.apply_chat_template(media, add_vision_id=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "?<|im_end|>\n")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_processor_and_model_on_real_images(family: str, built: dict[str, Path], images) -> None:
    proc, model = _load(built[family])
    astronaut, china = images
    messages = _conversation({"image": astronaut}, {"image": china})
    out = proc.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                   return_assistant_tokens_mask=True)
    ids = out["input_ids"][0]
    n_image = int((ids == model.config.image_token_id).sum())
    assert n_image == expected_image_tokens(family, astronaut) + expected_image_tokens(family, china)
    if family == "llava":
        assert n_image == 2 * 576
    if family in ("qwen2_vl", "qwen2_5_vl"):
        assert out["image_grid_thw"].tolist() == [[1, 36, 36], [1, 30, 46]]
        assert n_image == int(out["image_grid_thw"].prod(-1).sum()) // 4
    if family == "idefics3":
        assert _idefics3_tiles(512, 512) == (4, 4) and _idefics3_tiles(427, 640) == (3, 4)
        tok = proc.tokenizer
        count = lambda t: int((ids == tok.convert_tokens_to_ids(t)).sum())  # noqa: E731
        assert count("<global-img>") == 2 and count("<row_4_col_4>") == 1 and count("<row_3_col_4>") == 2
        assert count("<fake_token_around_image>") == (16 + 2) + (12 + 2)
        assert out["pixel_values"].shape[:2] == (1, 17 + 13)
    if family == "llava_next":
        # Both pick the 672x672 pinpoint: a base view and 4 tiles. The square astronaut keeps all 48x48
        # features; china (640x427) keeps 32 of 48 rows.
        assert _llava_next_tokens(512, 512) == 576 + 48 * 49 and _llava_next_tokens(427, 640) == 576 + 32 * 49
        assert out["pixel_values"].shape == (2, 5, 3, 336, 336)
        assert out["image_sizes"].tolist() == [[512, 512], [427, 640]]
    bos = proc.tokenizer.bos_token_id
    if bos is not None:
        assert ids[0] == bos and int((ids == bos).sum()) == 1
    assert proc.tokenizer.decode(ids[out["assistant_masks"][0].bool()]) == ASSISTANT_TEXT[family]

    inputs = {k: v for k, v in out.items() if k != "assistant_masks"}
    labels = torch.where(out["assistant_masks"].bool(), out["input_ids"], -100)
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    assert torch.isfinite(loss) and 0 < loss.item() < 20


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_vl_video(family: str, built: dict[str, Path], images) -> None:
    proc, model = _load(built[family])
    frame = np.asarray(images[0].resize((112, 112)))
    video = np.stack([frame, frame[::-1], frame[:, ::-1], frame])  # 4 frames -> 2 temporal patches
    messages = [
        {"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "Nothing."},
    ]
    out = proc.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    grid = out["video_grid_thw"]
    assert grid[0, 0] == 2
    assert int((out["input_ids"] == model.config.video_token_id).sum()) == int(grid.prod()) // 4
    with torch.no_grad():
        loss = model(**out, labels=out["input_ids"]).loss
    assert torch.isfinite(loss)


def test_build_is_deterministic(built: dict[str, Path], tmp_path: Path) -> None:
    for family, first in built.items():
        again = build_tiny(family, tmp_path / family)
        names = sorted(p.name for p in first.iterdir())
        assert names == sorted(p.name for p in again.iterdir())
        assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors",
                "chat_template.jinja", "processor_config.json"} <= set(names)
        for name in names:
            assert (first / name).read_bytes() == (again / name).read_bytes(), f"{family}/{name}"


def test_cli_builds_the_same_bytes_in_a_fresh_process(built: dict[str, Path], tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    listing = subprocess.run([sys.executable, "-m", "trainer.models.tiny", "--list"], capture_output=True,
                             text=True, check=True, cwd=repo)
    assert [line.split("\t")[0] for line in listing.stdout.splitlines()] == FAMILY_NAMES
    # Another process has another hash seed: nothing may depend on set or dict iteration order.
    out = tmp_path / "qwen2_vl"
    subprocess.run([sys.executable, "-m", "trainer.models.tiny", "--family", "qwen2_vl", "--out", str(out)],
                   capture_output=True, check=True, cwd=repo, env={**os.environ, "PYTHONHASHSEED": "12345"})
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert (out / name).read_bytes() == (built["qwen2_vl"] / name).read_bytes(), name
    assert main(["--list"]) == 0
