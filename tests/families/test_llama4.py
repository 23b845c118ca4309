"""meta-llama/Llama-4-Scout-17B-16E-Instruct: header turns closed by <|eot|>, up to 16 336-px tiles plus a
global view of 144 tokens each, chunked-attention rope layers and NoPE full-attention layers, a mixture of
experts with a shared expert in every layer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.families.oracles import TEXT_ONLY, FamilyOracles, conversation
from tests.support.samples import PHOTOS, SAMPLES, summed_loss
from trainer import attention

# preprocessor_config.json: 336-px tiles, max_patches 16; processor_config.json / the vision config: 14-px
# patches, pixel_shuffle_ratio 0.5.
TILE, PATCH, SHUFFLE, MAX_TILES = 336, 14, 0.5, 16
TOKENS_PER_TILE = int((TILE // PATCH) ** 2 * SHUFFLE**2)  # 24 x 24 patches, 2 x 2 into one: 144
CHUNK = 64  # attention_chunk_size for the tests that make chunks bite (the real one is 8192)
PIXELS_IN_BF16 = (
    "transformers 5.25: Llama4ImageProcessor normalises in bf16 and Llama4ForConditionalGeneration does not "
    "cast pixel_values to its vision tower's dtype, so an fp32 model refuses the processor's output"
)


def grid(height: int, width: int) -> tuple[int, int]:
    """Rows and columns of 336-px tiles the image is fitted into without distortion: of the grids of at
    most 16 tiles, the one that enlarges it least, else shrinks it least; among equal scales the fewest
    tiles (the least padding)."""
    grids = [(r, c) for r in range(1, MAX_TILES + 1) for c in range(1, MAX_TILES + 1) if r * c <= MAX_TILES]
    scale = {g: min(g[0] * TILE / height, g[1] * TILE / width) for g in grids}
    up = [s for s in scale.values() if s >= 1]
    best = min(up) if up else max(scale.values())
    return min((g for g in grids if scale[g] == best), key=lambda g: g[0] * g[1])


def tiles(height: int, width: int) -> int:
    """Tiles of the grid, plus the global view when there are several."""
    rows, cols = grid(height, width)
    return rows * cols + (rows * cols > 1)


def with_chunk(path, tmp_path, chunk: int = CHUNK, **text):
    """A copy of the tiny checkpoint whose chunked layers attend within `chunk` tokens (and other text
    config values changed): the adapter and the model both read it."""
    copy = tmp_path / "llama4"
    shutil.copytree(path, copy)
    config = json.loads((copy / "config.json").read_text())
    config["text_config"].update(attention_chunk_size=chunk, **text)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def own_masks(model, inputs: dict) -> dict[str, torch.Tensor]:
    """The masks the model builds itself for `inputs` (no mmloom_mask: from the positions) and hands
    its decoder layers, by layer type."""
    text = model.config.get_text_config()
    masks = {}

    def keep(kind: str):
        def hook(module, args, kwargs) -> None:
            masks.setdefault(kind, kwargs["attention_mask"])

        return hook

    layers = model.language_model.model.layers
    hooks = [
        layer.register_forward_pre_hook(keep(kind), with_kwargs=True)
        for layer, kind in zip(layers, text.layer_types)
    ]
    with torch.no_grad():
        model(**{k: v for k, v in inputs.items() if k not in ("labels", "mmloom_mask")}, use_cache=False)
    for hook in hooks:
        hook.remove()
    return masks


class TestLlama4(FamilyOracles):
    FAMILY = "llama4"
    SPECIAL_TOKENS = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|header_start|>",
        "<|header_end|>",
        "<|eom|>",
        "<|eot|>",
        "<|finetune_right_pad|>",
        "<|image_start|>",
        "<|image_end|>",
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
        "<|image|>",
        "<|patch|>",
    ]
    TOKENIZER_ROLES = ("<|begin_of_text|>", "<|eot|>", "<|finetune_right_pad|>", True)
    # The system prompt gets its own header turn; an image is <|image|> in place.
    FULL_RENDER = (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are terse.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nWhat is this?<|image|><|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nAn astronaut.<|eot|>"
        "<|header_start|>user<|header_end|>\n\n<|image|>And this?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nA palace.<|eot|>"
    )
    GENERATION_PROMPT = "<|header_start|>assistant<|header_end|>\n\n"
    ASSISTANT_TEXT = "An astronaut.<|eot|>A palace.<|eot|>"
    TEXT_ONLY_RENDER = (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nHello.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nab<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )
    LORA_OVERRIDES = ["finetune.lora.experts=true"]  # the exported adapter carries the experts' LoRA
    QLORA_REFUSED = True  # the experts (3-D parameters) are most of the weights: trainer/moe.py

    def expected_image_tokens(self, image) -> int:
        return tiles(image.size[1], image.size[0]) * TOKENS_PER_TILE

    def check_geometry(self, config, processor) -> None:
        vision, text = config.vision_config, config.text_config
        assert (vision.image_size, vision.patch_size, vision.pixel_shuffle_ratio) == (TILE, PATCH, SHUFFLE)
        # The pixel shuffle turns 2 x 2 patches into one token 4x as wide, which the adapter MLP takes.
        assert vision.intermediate_size == 4 * vision.hidden_size
        assert vision.projector_input_dim == vision.projector_output_dim == vision.vision_output_dim
        assert (processor.patch_size, processor.downsample_ratio) == (PATCH, 4)
        image = processor.image_processor
        assert image.size == {"height": TILE, "width": TILE} and image.max_patches == MAX_TILES
        assert not image.resize_to_max_canvas and image.resample == 2
        assert list(image.image_mean) == list(image.image_std) == [0.5] * 3
        tok = processor.tokenizer.convert_tokens_to_ids
        assert config.image_token_index == tok("<|patch|>")  # the tile features replace the patch tokens
        assert (config.boi_token_index, config.eoi_token_index) == (
            tok("<|image_start|>"),
            tok("<|image_end|>"),
        )
        # Rope + chunked attention in three of four layers, NoPE + full attention in the fourth: both kinds.
        assert text.layer_types == ["chunked_attention", "full_attention"] and text.no_rope_layers == [1, 0]
        assert text.attention_chunk_size == 8192 and text.use_qk_norm
        assert (text.attn_temperature_tuning, text.floor_scale, text.attn_scale) == (True, 8192, 0.1)
        rope = text.rope_parameters
        assert (rope["rope_type"], rope["rope_theta"], rope["factor"]) == ("llama3", 500000.0, 16.0)
        assert (rope["low_freq_factor"], rope["high_freq_factor"]) == (1.0, 1.0)
        assert rope["original_max_position_embeddings"] == 8192 and text.max_position_embeddings == 10485760
        # Scout: every layer a mixture of experts, top-1, with a shared expert.
        assert text.moe_layers == list(range(text.num_hidden_layers)) and text.num_experts_per_tok == 1
        assert 1 < text.num_local_experts <= 16
        assert text.eos_token_id == [tok("<|end_of_text|>"), tok("<|eom|>"), tok("<|eot|>")]

    def check_real_images(self, out, processor) -> None:
        # Both photographs take a 2 x 2 grid and a global view: 10 tiles, bf16 as the processor makes them.
        assert grid(512, 512) == grid(427, 640) == (2, 2)
        assert out["pixel_values"].shape == (10, 3, TILE, TILE)
        assert out["pixel_values"].dtype == torch.bfloat16
        tok = processor.tokenizer
        block = (
            "<|image_start|>"
            + "<|patch|>" * 144
            + "<|tile_x_separator|>"
            + "<|patch|>" * 144
            + "<|tile_y_separator|>"
            + "<|patch|>" * 144
            + "<|tile_x_separator|>"
            + "<|patch|>" * 144
            + "<|tile_y_separator|>"
            + "<|image|>"
            + "<|patch|>" * 144
            + "<|image_end|>"
        )
        text = tok.decode(out["input_ids"][0])
        assert text.count(block) == 2
        assert text.replace(block, "<|image|>") == self.FULL_RENDER

    # --- the chat template ---------------------------------------------------------------------------

    def test_chat_template_renders_as_the_published_one(self, path) -> None:
        """The published template (transformers ships it in processing_llama4.py) renders every prefix of
        the test conversations as the tiny one does, which only adds the {% generation %} markers."""
        from transformers import AutoProcessor
        from transformers.models.llama4.processing_llama4 import chat_template as published

        proc = AutoProcessor.from_pretrained(path)
        for messages in (conversation(), TEXT_ONLY):
            for k in range(1, len(messages) + 1):
                for prompt in (False, True):
                    ours = proc.apply_chat_template(messages[:k], add_generation_prompt=prompt)
                    theirs = proc.apply_chat_template(
                        messages[:k], add_generation_prompt=prompt, chat_template=published
                    )
                    assert ours == theirs, (k, prompt)

    # --- images --------------------------------------------------------------------------------------

    def test_a_small_image_is_one_tile_without_a_global_view(self, path) -> None:
        from PIL import Image
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        assert tiles(64, 64) == 1 and tiles(144, 176) == 1  # a grey dummy image, a video frame
        out = proc(text=["<|image|>"], images=[Image.new("RGB", (64, 64))], add_special_tokens=False)
        assert proc.tokenizer.decode(out["input_ids"][0]) == (
            "<|image_start|><|image|>" + "<|patch|>" * TOKENS_PER_TILE + "<|image_end|>"
        )

    def test_the_adapter_hands_the_model_the_processors_pixels_in_float32(self, path) -> None:
        from trainer.data.render import decode_image
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        photo = decode_image(PHOTOS["img0.jpg"])
        out = adapter.processor(text=["<|image|>"], images=[photo], return_tensors="pt")
        media = adapter.media_of(out)
        assert out["pixel_values"].dtype == torch.bfloat16 and media["pixel_values"].dtype == torch.float32
        assert torch.equal(media["pixel_values"], out["pixel_values"].float())

    @pytest.mark.xfail(strict=True, raises=RuntimeError, reason=PIXELS_IN_BF16)
    def test_an_fp32_model_takes_the_processors_pixels(self, path) -> None:
        """Why the adapter casts the pixels. Strict: the release that casts them fails here."""
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
        out = proc(text=["<|image|>"], images=[Image.new("RGB", (64, 64))], return_tensors="pt")
        with torch.no_grad():
            model(**out)

    # --- packing -------------------------------------------------------------------------------------

    def test_masks_are_the_models_own_for_one_sample_and_for_a_pack(self, path, tmp_path) -> None:
        """With chunks of CHUNK tokens (so that they bite): for one sample, and for a pack of three with
        restarting positions, the adapter's masks are exactly those the model builds itself from the
        positions, layer type by layer type; the chunked ones restart their chunks with each sample."""
        from trainer.data.packing import collate
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        chunked = with_chunk(path, tmp_path)
        adapter = get_adapter(chunked)
        model = adapter.load_model(dtype=torch.float32, attn_implementation="sdpa").eval()
        rendered = [render_sample(adapter, s, PHOTOS) for s in SAMPLES]
        for group in (rendered[:1], rendered):
            inputs = dict(collate(adapter, group).inputs)
            ours = adapter.attention_masks(inputs["mmloom_mask"], "sdpa")
            theirs = own_masks(model, inputs)
            assert set(ours) == set(theirs) == {"chunked_attention", "full_attention"}
            causal = torch.ones(ours["full_attention"].shape[-2:], dtype=torch.bool).tril()[None, None]
            for kind in ours:  # None: SDPA's is_causal, for one sample without chunks that bite
                assert torch.equal(ours[kind], causal if theirs[kind] is None else theirs[kind]), kind
        full, chunk = ours["full_attention"][0, 0], ours["chunked_attention"][0, 0]
        start = rendered[0].length + rendered[1].length  # the third sample: its chunks count from its start
        assert start % CHUNK and chunk[start + CHUNK - 1, start]
        assert not chunk[start + CHUNK, start + CHUNK - 1]
        row_boundary = start + (-start) % CHUNK  # where chunks counted from the row's start would cut
        assert chunk[row_boundary, row_boundary - 1]
        assert full[start + CHUNK, start] and not full[start, start - 1]

    @pytest.mark.parametrize("backend", ["sdpa", "trainer", attention.FLEX])
    def test_packed_loss_with_short_chunks_is_per_sample(self, path, tmp_path, backend) -> None:
        """With chunks of CHUNK tokens, on each backend the trainer may run (as tests/unit/test_packed_loss.py
        does with the real chunks, which never bite in its packs)."""
        from trainer.data.packing import collate
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        adapter = get_adapter(with_chunk(path, tmp_path))
        implementation = {"sdpa": "sdpa", "trainer": adapter.attn_implementation()}.get(
            backend
        ) or attention.per_module(adapter.config, backend)
        model = adapter.load_model(dtype=torch.float32, attn_implementation=implementation).eval()
        rendered = [render_sample(adapter, s, PHOTOS) for s in SAMPLES]
        assert all(adapter.packs_with(rendered[:i], rendered[i]) for i in range(1, len(rendered)))
        with torch.no_grad():
            alone = sum(summed_loss(model, dict(collate(adapter, [r]).inputs)) for r in rendered)
            packed = summed_loss(model, dict(collate(adapter, rendered).inputs))
        assert abs(packed.item() - alone.item()) <= 1e-6 * abs(alone.item()), (packed.item(), alone.item())
        # Not vacuous: with the real 8192-token chunks the same weights lose another loss on sample 1.
        real = get_adapter(path)
        with torch.no_grad():
            whole = summed_loss(
                real.load_model(dtype=torch.float32).eval(), dict(collate(real, rendered[:1]).inputs)
            )
            first = summed_loss(model, dict(collate(adapter, rendered[:1]).inputs))
        assert abs(first.item() - whole.item()) > 1e-4 * abs(whole.item())

    def test_long_rows_hold_one_sample_for_the_temperature_tuning(self, path, tmp_path) -> None:
        """transformers scales a NoPE layer's queries by the token's index in the row, not in its sample
        (with floor_scale shrunk to 64 a pack then loses another loss than its samples alone), so the
        adapter packs several samples only into rows shorter than floor_scale."""
        from trainer.data.packing import collate
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        adapter = get_adapter(with_chunk(path, tmp_path, chunk=8192, floor_scale=64))
        model = adapter.load_model(dtype=torch.float32, attn_implementation="sdpa").eval()
        rendered = [render_sample(adapter, s, PHOTOS) for s in SAMPLES]
        with torch.no_grad():
            alone = sum(summed_loss(model, dict(collate(adapter, [r]).inputs)) for r in rendered)
            packed = summed_loss(model, dict(collate(adapter, rendered).inputs))
        assert abs(packed.item() - alone.item()) > 1e-5 * abs(alone.item())  # 10x the packing oracle's
        assert not adapter.packs_with(rendered[:1], rendered[1])  # a row of 64 tokens or more
        assert adapter.packs_with([], rendered[2])  # alone, a sample of any length
        real = get_adapter(path)  # floor_scale 8192
        short, long = rendered[1], rendered[2]
        assert 5 * long.length + short.length < 8192 <= 6 * long.length
        assert real.packs_with([long] * 5, short)
        assert not real.packs_with([long] * 5, long)  # the last sample's tokens would be scaled

    # --- the model -----------------------------------------------------------------------------------

    def test_lora_targets_attention_and_shared_expert_not_routers_or_experts(self, path) -> None:
        from trainer.config import FinetuneConfig
        from trainer.lora import lora_targets
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        model = adapter.load_model(dtype=torch.float32)
        names = lora_targets(adapter, model, FinetuneConfig(method="lora"))
        layer = "language_model.model.layers.0."
        assert {n.removeprefix(layer) for n in names if n.startswith(layer)} == {
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "feed_forward.shared_expert.gate_proj",
            "feed_forward.shared_expert.up_proj",
            "feed_forward.shared_expert.down_proj",
        }
        assert all(adapter.param_group(n + ".weight") == "llm" for n in names)
        experts = model.language_model.model.layers[0].feed_forward.experts
        assert experts.gate_up_proj.ndim == experts.down_proj.ndim == 3
        assert adapter.param_group("vision_model.vision_adapter.mlp.fc1.weight") == "vision"
        assert adapter.param_group("multi_modal_projector.linear_1.weight") == "projector"

    def test_a_config_transformers_4_51_wrote_is_refused_with_what_to_do(self, path, tmp_path) -> None:
        from trainer.models.registry import get_adapter

        legacy = tmp_path / "legacy"
        shutil.copytree(path, legacy)
        config = json.loads((legacy / "config.json").read_text())
        config["text_config"]["attn_temperature_tuning"] = 4  # as the published configs have it
        (legacy / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="attn_temperature_tuning is 4.*Set it to true"):
            get_adapter(legacy)
