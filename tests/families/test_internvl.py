"""OpenGVLab/InternVL3-1B-hf: ChatML turns with no default system prompt, 448-px tiles (1-12 by aspect
ratio plus a thumbnail) of 256 tokens each between <img> and </img>."""

from __future__ import annotations

import torch

from tests.families.oracles import FamilyOracles


def tile_grid(height: int, width: int) -> tuple[int, int]:
    """(columns, rows) InternVL's dynamic_preprocess picks (min_dynamic_patch 1, max_dynamic_patch 12): the
    grid whose aspect ratio is closest to the image's; on a tie the larger grid, while the image covers
    more than half of its area."""
    grids = sorted(
        {(i, j) for i in range(1, 13) for j in range(1, 13) if i * j <= 12}, key=lambda g: g[0] * g[1]
    )
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(width / height - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * 448 * 448 * cols * rows:
            best = (cols, rows)
    return best


def tiles(height: int, width: int) -> int:
    cols, rows = tile_grid(height, width)
    return cols * rows + (cols * rows > 1)  # the thumbnail (use_thumbnail) when the image was split


class TestInternVL(FamilyOracles):
    FAMILY = "internvl"
    SPECIAL_TOKENS = [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<quad>",
        "</quad>",
        "<ref>",
        "</ref>",
        "<box>",
        "</box>",
    ]
    TOKENIZER_ROLES = (None, "<|im_end|>", "<|endoftext|>", False)
    FULL_RENDER = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is this?<IMG_CONTEXT>\n<|im_end|>\n"
        "<|im_start|>assistant\nAn astronaut.<|im_end|>\n"
        "<|im_start|>user\n<IMG_CONTEXT>\nAnd this?<|im_end|>\n"
        "<|im_start|>assistant\nA palace.<|im_end|>\n"
    )
    GENERATION_PROMPT = "<|im_start|>assistant\n"
    ASSISTANT_TEXT = "An astronaut.<|im_end|>A palace.<|im_end|>"
    # Unlike Qwen2-VL, no default system prompt.
    TEXT_ONLY_RENDER = (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    )

    def expected_image_tokens(self, image) -> int:
        # 448 / 14 = 32 patches a side, pixel-shuffled by downsample_ratio 0.5 to 16 x 16 = 256 per tile.
        return tiles(image.size[1], image.size[0]) * 256

    def check_geometry(self, config, processor) -> None:
        vision = config.vision_config
        assert (tuple(vision.image_size), tuple(vision.patch_size)) == ((448, 448), (14, 14))
        assert config.downsample_ratio == 0.5 and config.image_seq_length == 256
        assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "default")
        assert processor.image_seq_length == 256
        image = processor.image_processor
        assert image.size == {"height": 448, "width": 448}
        assert (image.min_patches, image.max_patches) == (1, 12)
        assert list(image.image_mean) == [0.485, 0.456, 0.406]
        assert list(image.image_std) == [0.229, 0.224, 0.225]
        assert config.text_config.rope_parameters["rope_type"] == "dynamic"
        assert config.text_config.rope_parameters["factor"] == 2.0

    def check_real_images(self, out, processor) -> None:
        assert tile_grid(512, 512) == (1, 1) and tile_grid(427, 640) == (3, 2)
        assert out["pixel_values"].shape == (1 + 3 * 2 + 1, 3, 448, 448)
        ids, tok = out["input_ids"][0], processor.tokenizer
        starts = (ids == tok.convert_tokens_to_ids("<img>")).nonzero().flatten()
        ends = (ids == tok.convert_tokens_to_ids("</img>")).nonzero().flatten()
        assert (ends - starts - 1).tolist() == [256, 7 * 256]  # one unbroken <IMG_CONTEXT> run per image

    def test_tall_and_small_images(self, path) -> None:
        # A tall strip is cut into a column of tiles; a small square stays one tile with no thumbnail.
        from PIL import Image
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        assert tile_grid(800, 200) == (1, 4)
        for size, n in (((200, 800), 5), ((64, 64), 1)):
            image = Image.new("RGB", size, (10, 200, 30))
            out = proc(text=["<IMG_CONTEXT>\n"], images=[image], return_tensors="pt")
            assert out["pixel_values"].shape[0] == n == tiles(size[1], size[0])
            assert int((out["input_ids"] == proc.image_token_id).sum()) == 256 * n

    def test_vision_blocks_are_units_and_take_lora(self, path) -> None:
        # InternViT keeps its blocks in `encoder.layer` (not `layers`): they must still be FSDP /
        # checkpointing units and get LoRA with finetune.lora.vision.
        from transformers import AutoModelForImageTextToText

        from trainer.config import FinetuneConfig
        from trainer.lora import lora_targets
        from trainer.models.registry import get_adapter
        from trainer.parallel import transformer_blocks

        adapter = get_adapter(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
        blocks = [type(parent[i]).__name__ for parent, _, i in transformer_blocks(model)]
        assert blocks == ["InternVLVisionLayer"] * 2 + ["Qwen2DecoderLayer"] * 2
        groups = {n: adapter.param_group(n) for n, _ in model.named_parameters()}
        assert {n.split(".")[1] for n, g in groups.items() if g == "vision"} == {"vision_tower"}
        assert {n.split(".")[1] for n, g in groups.items() if g == "projector"} == {"multi_modal_projector"}
        ft = FinetuneConfig(method="lora", freeze_vision=False)
        ft.lora.vision = True
        targets = lora_targets(adapter, model, ft)
        assert {f"model.vision_tower.encoder.layer.1.attention.{p}_proj" for p in "qkv"} <= set(targets)
        assert "model.language_model.layers.0.self_attn.q_proj" in targets
        assert not any("multi_modal_projector" in t for t in targets)

    def test_packed_samples_keep_their_own_tiles(self, tiny) -> None:
        # The model takes tiles in order: packed, sample k's image features land on sample k's tokens.
        from tests.support.samples import PHOTOS, SAMPLES
        from trainer.data.packing import collate
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        adapter = get_adapter(tiny(self.FAMILY))
        rendered = [render_sample(adapter, s, PHOTOS) for s in SAMPLES]
        pack = collate(adapter, rendered).inputs
        tiles_alone = [r.media["pixel_values"] for r in rendered if r.media]
        assert torch.equal(pack["pixel_values"], torch.cat(tiles_alone))
        assert torch.equal(pack["position_ids"][0], torch.cat([torch.arange(r.length) for r in rendered]))
