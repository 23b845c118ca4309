"""microsoft/Phi-4-multimodal-instruct (transformers-native): "<|user|>...<|end|><|assistant|>" turns,
dynamic HD of up to 36 crops of 448 px plus a global view, SigLIP-448/14 features pooled 2x2."""

from __future__ import annotations

import math

import pytest
import torch

from tests.families.oracles import FamilyOracles

# transformers 5.23-5.25 bugs the oracles meet with plain AutoProcessor / config access (see the tests below
# that run the same oracles with mmloom's workarounds).
PROCESSOR_DROPS_TEMPLATE = (
    "transformers 5.23-5.25: Phi4MultimodalProcessor.__init__ does not name "
    "chat_template, so AutoProcessor.from_pretrained drops chat_template.jinja and "
    "apply_chat_template raises"
)
NO_TOP_LEVEL_IMAGE_TOKEN_ID = "Phi4MultimodalConfig keeps image_token_id in vision_config only"


def hd_tokens(height: int, width: int) -> int:
    """<|image|> tokens of the published dynamic-HD scheme: the image is scaled into the smallest grid of
    448-px crops that holds it (at most 36, which the test images never reach) and padded right or down;
    each crop is 32x32 patches of 14 px, pooled 2x2 into 16x16 tokens, and padding patches are dropped.
    The sub-image tokens get one newline token per row, then come a separator and the global 448-px view
    (16x16 tokens with 16 newlines)."""
    cols, rows = math.ceil(width / 448), math.ceil(height / 448)
    assert cols * rows <= 36
    if cols * 448 / width < rows * 448 / height:
        new_w, new_h = cols * 448, int(height * cols * 448 / width)
    else:
        new_w, new_h = int(width * rows * 448 / height), rows * 448
    pad_w, pad_h = cols * 448 - new_w, rows * 448 - new_h
    patch_cols = cols * 32 - (pad_w // 14 if pad_w >= 14 else 0)
    patch_rows = rows * 32 - (pad_h // 14 if pad_h >= 14 else 0)
    tok_w, tok_h = math.ceil(patch_cols / 2), math.ceil(patch_rows / 2)
    return tok_h * tok_w + tok_h + 1 + 16 * 16 + 16


class TestPhi4Multimodal(FamilyOracles):
    FAMILY = "phi4_multimodal"
    SPECIAL_TOKENS = [
        "<|endoftext|>",
        "<|image|>",
        "<|audio|>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
        "<|endofprompt|>",
        "<|tool|>",
        "<|/tool|>",
        "<|tool_call|>",
        "<|/tool_call|>",
        "<|tool_response|>",
        "<|tag|>",
    ]
    TOKENIZER_ROLES = ("<|endoftext|>", "<|endoftext|>", "<|endoftext|>", False)
    FULL_RENDER = (
        "<|system|>You are terse.<|end|>"
        "<|user|>What is this?<|image|><|end|><|assistant|>An astronaut.<|end|>"
        "<|user|><|image|>And this?<|end|><|assistant|>A palace.<|end|>"
    )
    GENERATION_PROMPT = "<|assistant|>"
    ASSISTANT_TEXT = "An astronaut.<|end|>A palace.<|end|>"
    TEXT_ONLY_RENDER = "<|user|>Hi<|end|><|assistant|>Hello.<|end|><|user|>ab<|end|><|assistant|>"

    def expected_image_tokens(self, image) -> int:
        return hd_tokens(image.size[1], image.size[0])

    def check_geometry(self, config, processor) -> None:
        vision = config.vision_config
        assert (vision.image_size, vision.patch_size, vision.crop_size, vision.feature_layer) == (
            448,
            14,
            448,
            -2,
        )
        image_processor = processor.image_processor
        assert image_processor.size == {"height": 448, "width": 448}
        assert (image_processor.dynamic_hd, image_processor.patch_size) == (36, 14)
        assert list(image_processor.image_mean) == list(image_processor.image_std) == [0.5, 0.5, 0.5]
        rope = config.rope_parameters
        assert (
            rope["rope_type"],
            rope["partial_rotary_factor"],
            rope["original_max_position_embeddings"],
        ) == ("longrope", 0.75, 4096)
        assert config.max_position_embeddings == 131072 and config.sliding_window == 262144
        assert config.tie_word_embeddings
        tok = processor.tokenizer
        ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|end|>", "<|image|>", "<|audio|>"])
        assert config.eos_token_id == ids[:2] and config.bos_token_id == config.pad_token_id == ids[0]
        assert (vision.image_token_id, config.audio_config.audio_token_id) == tuple(ids[2:])
        # The real ids: <|image|> 200010, <|audio|> 200011, then <|endofprompt|> 200018 .. <|tag|> 200028.
        assert ids[3] == ids[2] + 1
        run = tok.convert_tokens_to_ids(
            [
                "<|endofprompt|>",
                "<|assistant|>",
                "<|end|>",
                "<|user|>",
                "<|system|>",
                "<|tool|>",
                "<|/tool|>",
                "<|tool_call|>",
                "<|/tool_call|>",
                "<|tool_response|>",
                "<|tag|>",
            ]
        )
        assert run == list(range(run[0], run[0] + 11))

    def check_real_images(self, out, processor) -> None:
        # astronaut 512x512 -> 2x2 crops, nothing padded; china 640x427 -> 2x1 crops, 225 px of padding on
        # the right (16 patch columns): 24 of 32 token columns.
        assert hd_tokens(512, 512) == 32 * 33 + 1 + 272 and hd_tokens(427, 640) == 16 * 25 + 1 + 272
        assert out["image_sizes"].tolist() == [[896, 896], [448, 896]]
        assert out["image_pixel_values"].shape == (2, 5, 3, 448, 448)  # global view + up to 4 crops
        assert out["image_attention_mask"].shape == (2, 5, 32, 32)
        assert out["image_pixel_values"][1, 3:].abs().sum() == 0 and out["image_attention_mask"][1, 3:].all()
        assert int(out["image_attention_mask"][1, 2].sum()) == 32 * 16

    # --- the oracles meet two transformers 5.23-5.25 bugs; the same oracles pass with mmloom's workarounds

    @pytest.mark.xfail(strict=True, raises=ValueError, reason=PROCESSOR_DROPS_TEMPLATE)
    def test_chat_template_format_and_prefixes(self, path) -> None:
        super().test_chat_template_format_and_prefixes(path)

    @pytest.mark.xfail(
        strict=True,
        raises=(ValueError, AttributeError),
        reason=f"{PROCESSOR_DROPS_TEMPLATE}; {NO_TOP_LEVEL_IMAGE_TOKEN_ID}",
    )
    def test_processor_and_model_on_real_images(self, path, images) -> None:
        super().test_processor_and_model_on_real_images(path, images)

    @pytest.fixture
    def adapters_processor(self, path, monkeypatch):
        """AutoProcessor.from_pretrained gives the processor mmloom renders with (chat template restored
        from the tokenizer), and the config answers image_token_id from its vision_config."""
        from transformers import AutoProcessor, Phi4MultimodalConfig

        from trainer.models.registry import get_adapter

        processor = get_adapter(path).processor
        assert AutoProcessor.from_pretrained(path).chat_template is None  # the bug, still there
        monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda *args, **kwargs: processor)
        monkeypatch.setattr(
            Phi4MultimodalConfig,
            "image_token_id",
            property(lambda self: self.vision_config.image_token_id),
            raising=False,
        )
        return processor

    def test_chat_template_with_the_adapters_processor(self, path, adapters_processor) -> None:
        super().test_chat_template_format_and_prefixes(path)

    def test_real_images_with_the_adapters_processor(self, path, images, adapters_processor) -> None:
        super().test_processor_and_model_on_real_images(path, images)

    # --- family specifics ------------------------------------------------------------------------

    def test_the_published_templates_final_eos_is_dropped(self, path) -> None:
        # The published template ends a conversation rendered without the generation prompt with
        # <|endoftext|>; mmloom drops it, so the render equals the prefix-consistent one.
        from tests.support.samples import CONVERSATIONS, PHOTOS
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        sample = CONVERSATIONS["multi_turn_multi_image_system"]
        expected = render_sample(adapter, sample, PHOTOS)
        template = adapter.processor.chat_template
        published = template.replace(
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}",
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}",
        )
        assert published != template
        adapter.processor.chat_template = published
        assert (
            adapter.processor.apply_chat_template([{"role": "user", "content": "Hi"}])
            == "<|user|>Hi<|end|><|endoftext|>"
        )
        assert (
            adapter.chat_text([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
            == "<|user|>Hi<|end|>"
        )
        r = render_sample(adapter, sample, PHOTOS)
        assert torch.equal(r.input_ids, expected.input_ids) and torch.equal(r.labels, expected.labels)

    def test_audio_counts_with_the_media_encoders(self, path) -> None:
        from transformers import AutoModelForCausalLM

        from trainer.config import FinetuneConfig
        from trainer.lora import lora_targets
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        assert adapter.auto_class() is AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path)
        group = {n: adapter.param_group(n) for n, _ in model.named_parameters()}
        image = "model.embed_tokens_extend.image_embed."
        assert {n for n, g in group.items() if g == "projector"} == {
            image + p
            for p in (
                "img_projection_up.weight",
                "img_projection_up.bias",
                "img_projection_down.weight",
                "img_projection_down.bias",
                "global_img_feature_extensor",
                "sub_img_feature_extensor",
            )
        }
        assert {n for n, g in group.items() if g == "vision"} == {
            n
            for n in group
            if n.startswith((image + "img_processor.", "model.embed_tokens_extend.audio_embed."))
        }
        assert all(g == "llm" for n, g in group.items() if "embed_tokens_extend" not in n)
        ft = FinetuneConfig()
        ft.lora.vision = True
        targets = lora_targets(adapter, model, ft)
        assert not [t for t in targets if "audio_embed" in t]
        assert any("img_processor.encoder.layers" in t for t in targets) and any(
            ".qkv_proj" in t for t in targets
        )
        assert {n.split(".")[-1] for n in adapter.quant_skip_modules()} >= {"lm_head", "embed_tokens_extend"}

    def test_images_with_different_crop_counts_pack_exactly(self, path) -> None:
        # A small crop (1 HD crop + global view) and china (2 crops + global): packed, the crop dimension is
        # padded as one processor call pads it (zero pixels, all-ones masks) and the loss is still the
        # per-sample sum (the model reads each image's crop count from image_sizes).
        from tests.support.samples import SAMPLES, assert_packed_equals_alone, cropped_photo
        from trainer.data.packing import collate
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        small_sample, photos = cropped_photo((0, 0, 300, 200), "A corner.")
        rendered = [render_sample(adapter, s, photos) for s in (small_sample, SAMPLES[0])]
        assert [r.media["image_pixel_values"].shape[1] for r in rendered] == [2, 3]
        pack = collate(adapter, rendered).inputs
        assert pack["image_pixel_values"].shape == (2, 3, 3, 448, 448)
        assert pack["image_pixel_values"][0, 2].abs().sum() == 0 and pack["image_attention_mask"][0, 2].all()
        assert pack["image_sizes"].tolist() == [[448, 448], [448, 896]]
        assert int((pack["input_ids"] == adapter.processor.image_token_id).sum()) == hd_tokens(
            200, 300
        ) + hd_tokens(427, 640)
        assert_packed_equals_alone(path, adapter, rendered, pack)
