"""openbmb/MiniCPM-V-4.6 (transformers-native): Qwen3.5 ChatML with think blocks, MiniCPM-V's adaptive
slices (a 448-px source view plus up to 9 slices of the best grid) as NaViT rows of 14-px patches, 16
patches merged into a token, a Qwen3.5 hybrid text model (Gated DeltaNet + full attention)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tests.families.oracles import FamilyOracles, VideoOracles, conversation, video_members, video_sample

# The published processor_config.json: scale_resolution 448, max_slice_nums 9 (images and video
# frames), patch_size 14, downsample_mode "16x" (a 2x2 window merger inside the tower, then a 2x2
# merger): views are multiples of 56 px and a view of h x w patches costs h * w / 16 tokens. At "4x"
# (no window merger): multiples of 28 px, h * w / 4 tokens.
SCALE, MAX_SLICES, PATCH = 448, 9, 14
MERGE = {"16x": 4, "4x": 2}  # patches merged along each side


def _multiple(length: float, divisor: int) -> int:
    return max(round(length / divisor) * divisor, divisor)


def _view(height: float, width: float, upscale: bool, mode: str) -> tuple[int, int]:
    """Patch grid of one view: an image larger than 448x448 (or any, with `upscale`) resized to about
    448x448 at its aspect ratio, both sides then rounded to whole merged patches."""
    if height * width > SCALE * SCALE or upscale:
        ratio = width / height
        height = int(SCALE / math.sqrt(ratio))
        width = int(height * ratio)
    unit = PATCH * MERGE[mode]
    return _multiple(height, unit) // PATCH, _multiple(width, unit) // PATCH


def slice_grid(height: int, width: int, max_slices: int = MAX_SLICES) -> tuple[int, int] | None:
    """(rows, cols) of the slices: about one slice per 448x448 of area (at most `max_slices`), n-1, n or
    n+1 slices in the grid whose aspect ratio is closest to the image's (ties: more rows); None for an
    image of at most 448x448."""
    n = min(math.ceil(height * width / (SCALE * SCALE)), max_slices)
    if n <= 1:
        return None
    grids = [
        (r, k // r) for k in (n - 1, n, n + 1) if 1 < k <= max_slices for r in range(1, k + 1) if k % r == 0
    ]
    return min(grids, key=lambda g: (abs(math.log(width / height) - math.log(g[1] / g[0])), -g[0]))


def views(height: int, width: int, mode: str = "16x") -> list[tuple[int, int]]:
    """Patch grids of an image's views: its source view, then rows x cols slices of the image resized
    to the grid (each cell about 448x448, rounded to whole merged patches)."""
    grid = slice_grid(height, width)
    source = _view(height, width, upscale=grid is None, mode=mode)
    if grid is None:
        return [source]
    rows, cols = grid
    cell = _view(_multiple(height, rows) / rows, _multiple(width, cols) / cols, upscale=True, mode=mode)
    return [source] + [cell] * (rows * cols)


def tokens(height: int, width: int, mode: str = "16x") -> int:
    return sum(h * w for h, w in views(height, width, mode)) // MERGE[mode] ** 2


# How the published template renders conversation(): the earlier answer without its think block.
PUBLISHED_FULL_RENDER = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nWhat is this?\n<|image_pad|><|im_end|>\n"
    "<|im_start|>assistant\nAn astronaut.<|im_end|>\n"
    "<|im_start|>user\n<|image_pad|>\nAnd this?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\nA palace.<|im_end|>\n"
)
EMPTY_THINK = "<think>\n\n</think>\n\n"


class TestMiniCPMV4_6(VideoOracles, FamilyOracles):
    FAMILY = "minicpmv4_6"
    SPECIAL_TOKENS = [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<image>",
        "</image>",
        "<slice>",
        "</slice>",
        "<image_id>",
        "</image_id>",
        "<think>",
        "</think>",
        "<tool_call>",
        "<tool_response>",
    ]
    # tokenizer_config.json names <|im_start|> the BOS token; the tokenizer never adds it.
    TOKENIZER_ROLES = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", False)
    # As mmloom renders (and exports) it: every answer keeps its think block (PUBLISHED_FULL_RENDER: not).
    FULL_RENDER = PUBLISHED_FULL_RENDER.replace("\nAn astronaut.", "\n" + EMPTY_THINK + "An astronaut.")
    GENERATION_PROMPT = "<|im_start|>assistant\n" + EMPTY_THINK  # thinking off unless enable_thinking=true
    ASSISTANT_TEXT = "An astronaut.<|im_end|>A palace.<|im_end|>"
    TEXT_ONLY_RENDER = (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" + EMPTY_THINK + "Hello.<|im_end|>\n"
        "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n" + EMPTY_THINK
    )

    def expected_image_tokens(self, image) -> int:
        return tokens(image.size[1], image.size[0])

    def expected_video_tokens(self, frames: int, height: int, width: int) -> int:
        return frames * tokens(height, width)  # every frame an image of its own

    def check_geometry(self, config, processor) -> None:
        vision, text = config.vision_config, config.text_config
        assert (vision.patch_size, vision.image_size, vision.window_kernel_size) == (14, 980, [2, 2])
        # The window merger sits between tower layers (after layer 6 of 27 in the real tower).
        assert 0 <= config.insert_layer_id == vision.insert_layer_id < vision.num_hidden_layers - 1
        assert (config.merge_kernel_size, config.merger_times, config.downsample_mode) == ([2, 2], 1, "16x")
        # Qwen3.5-0.8B: Gated DeltaNet (conv kernel 4) and full attention layers, theta 1e7 over a quarter
        # of each head, 262144 positions.
        assert text.model_type == "qwen3_5_text" and text.linear_conv_kernel_dim == 4
        assert set(text.layer_types) == {"linear_attention", "full_attention"}
        rope = text.rope_parameters
        assert rope["rope_type"] == "default" and rope["rope_theta"] == 1e7
        assert rope["partial_rotary_factor"] == 0.25
        assert text.max_position_embeddings == 262144
        assert config.tie_word_embeddings and text.tie_word_embeddings
        for proc in (processor.image_processor, processor.video_processor):
            assert (proc.scale_resolution, proc.max_slice_nums, proc.patch_size) == (SCALE, MAX_SLICES, PATCH)
            assert proc.slice_mode and proc.use_image_id and proc.downsample_mode == "16x"
            assert list(proc.image_mean) == list(proc.image_std) == [0.5, 0.5, 0.5]
        assert (processor.video_processor.max_num_frames, processor.video_processor.stack_frames) == (128, 1)
        tok = processor.tokenizer
        ids = tok.convert_tokens_to_ids
        # The published ids: <|endoftext|> 248044 (eos_token_id), <|im_end|> 248046, <|image_pad|> 248056
        # (image_token_id), <|video_pad|> 248057 (video_token_id); <video> 248077, <image> 248078,
        # </image> 248079, <slice> 248088, </slice> 248089.
        assert config.eos_token_id == ids("<|endoftext|>") == ids("<|im_end|>") - 2
        assert (config.image_token_id, config.video_token_id) == (ids("<|image_pad|>"), ids("<|video_pad|>"))
        assert ids("<|image_pad|>") - ids("<|endoftext|>") == 12
        assert ids("<|video_pad|>") - ids("<|image_pad|>") == 1
        assert ids("<video>") - ids("<|video_pad|>") == 20
        markers = ("<image>", "</image>", "<slice>", "</slice>")
        assert [ids(t) - ids("<video>") for t in markers] == [1, 2, 11, 12]

    def check_real_images(self, out, processor) -> None:
        # astronaut 512x512: a 2x1 grid; china 640x427: 1x2. Each a 448-ish source view and 2 slices.
        assert slice_grid(512, 512) == (2, 1) and slice_grid(427, 640) == (1, 2)
        assert views(512, 512) == [(32, 32), (24, 44), (24, 44)]
        assert views(427, 640) == [(28, 40), (36, 28), (36, 28)]
        assert out["target_sizes"].tolist() == [list(v) for v in views(512, 512) + views(427, 640)]
        patches = sum(h * w for h, w in views(512, 512) + views(427, 640))
        assert out["pixel_values"].shape == (1, 3, PATCH, patches * PATCH)  # one NaViT row
        text = processor.tokenizer.decode(out["input_ids"][0])
        # Source view, then the slices row by row (rows joined by "\n"), each image after its id.
        pad = "<|image_pad|>"
        astronaut = f"<image>{pad * 64}</image><slice>{pad * 66}</slice>\n<slice>{pad * 66}</slice>"
        china = f"<image>{pad * 70}</image><slice>{pad * 63}</slice><slice>{pad * 63}</slice>"
        assert f"What is this?\n<image_id>0</image_id>{astronaut}<|im_end|>" in text
        assert f"user\n<image_id>1</image_id>{china}\nAnd this?" in text

    # --- the chat template ---------------------------------------------------------------------------

    @pytest.fixture
    def adapters_processor(self, path, monkeypatch):
        """AutoProcessor.from_pretrained gives the processor mmloom renders (and exports) with."""
        from transformers import AutoProcessor

        from trainer.models.registry import get_adapter

        processor = get_adapter(path).processor
        monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda *args, **kwargs: processor)
        return processor

    def test_chat_template_format_and_prefixes(self, path, adapters_processor) -> None:
        """The oracle on the adapter's processor (the published template is not prefix-consistent:
        test_the_published_template_drops_earlier_think_blocks), from the first user turn on: the
        template raises on a conversation without a user query."""
        from tests.families.oracles import TEXT_ONLY

        proc = adapters_processor
        messages = conversation()
        with pytest.raises(Exception, match="No user query found"):
            proc.apply_chat_template(messages[:1])
        full = proc.apply_chat_template(messages)
        assert full == self.FULL_RENDER
        for k in range(2, len(messages) + 1):
            head = proc.apply_chat_template(messages[:k])
            assert full.startswith(head), k
            if k < len(messages) and messages[k]["role"] == "assistant":
                prompt = proc.apply_chat_template(messages[:k], add_generation_prompt=True)
                assert prompt == head + self.GENERATION_PROMPT
                assert proc.apply_chat_template(messages[: k + 1]).startswith(prompt)
        assert proc.apply_chat_template(TEXT_ONLY, add_generation_prompt=True) == self.TEXT_ONLY_RENDER

    def test_the_published_template_drops_earlier_think_blocks(self, path) -> None:
        """The checkpoint's own template: the earlier answer without its think block, so the head of a
        conversation is no prefix of it; a system message cannot hold images."""
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        messages = conversation()
        full = proc.apply_chat_template(messages)
        assert full == PUBLISHED_FULL_RENDER
        head = proc.apply_chat_template(messages[:3])
        assert head.endswith(f"<|im_start|>assistant\n{EMPTY_THINK}An astronaut.<|im_end|>\n")
        assert not full.startswith(head)
        prompt = proc.apply_chat_template(messages[:2], add_generation_prompt=True)
        assert prompt.endswith(self.GENERATION_PROMPT)
        with pytest.raises(Exception, match="System message cannot contain images"):
            proc.apply_chat_template([{"role": "system", "content": [{"type": "image"}]}, *messages[1:]])

    def test_mmloom_renders_with_qwen3_5s_training_template(self, path) -> None:
        from transformers import AutoProcessor

        from trainer.models.qwen3_5 import DROPS_EARLIER_THINKING, training_template
        from trainer.models.registry import get_adapter

        published = AutoProcessor.from_pretrained(path).chat_template
        assert published.count(DROPS_EARLIER_THINKING) == 1
        assert get_adapter(path).processor.chat_template == training_template(published)
        thinking = [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nHello."},
            {"role": "user", "content": "Bye"},
        ]
        # Thinking mode opens the block in the generation prompt; a past answer's reasoning is dropped by
        # the published template and kept by mmloom's.
        proc = AutoProcessor.from_pretrained(path)
        prompt = proc.apply_chat_template(thinking[:1], add_generation_prompt=True, enable_thinking=True)
        assert prompt.endswith("<|im_start|>assistant\n<think>\n")
        assert "assistant\nHello.<|im_end|>" in proc.apply_chat_template(thinking)
        kept = get_adapter(path).processor.apply_chat_template(thinking)
        assert "assistant\n<think>\nA greeting.\n</think>\n\nHello.<|im_end|>" in kept

    def test_answers_with_reasoning_are_skipped(self, path) -> None:
        """The non-thinking generation prompt closes the think block, so an answer with reasoning cannot
        follow it: a counted skip, not a sample trained in a format inference never produces."""
        from tests.support.samples import sample
        from trainer.data.render import RenderError, render_sample
        from trainer.models.registry import get_adapter

        reasoning = sample(
            "r", [("user", ["Hi"]), ("assistant", ["<think>\nA greeting.\n</think>\n\nHello."])]
        )
        with pytest.raises(RenderError) as e:
            render_sample(get_adapter(path), reasoning, {})
        assert e.value.reason == "template_not_prefix_consistent"

    def test_answers_written_with_the_cookbooks_empty_think_block_train_the_same(self, path) -> None:
        """MiniCPM-V's LLaMA-Factory recipe writes every answer as "<think>\\n\\n</think>\\n\\n" + answer: the
        template takes the empty block for the answer's (empty) reasoning, so such data renders token for
        token as the plain answer, its think block in the prompt, untrained."""
        from tests.support.samples import PHOTOS, sample
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        turns = [
            ("user", ["img0.jpg", "What is it?"]),
            ("assistant", ["A roof."]),
            ("user", ["Sure?"]),
            ("assistant", ["Yes."]),
        ]
        cookbook = [
            (role, [EMPTY_THINK + t if role == "assistant" else t for t in parts]) for role, parts in turns
        ]
        a, b = (render_sample(adapter, sample(k, t), PHOTOS) for k, t in (("p", turns), ("c", cookbook)))
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert adapter.tokenizer.decode(a.input_ids[a.labels != -100]) == "A roof.<|im_end|>Yes.<|im_end|>"

    # --- rendering -----------------------------------------------------------------------------------

    def test_image_ids_count_over_the_whole_conversation(self, path) -> None:
        """The processor numbers images from 0 in every text it gets; mmloom tokenizes a conversation a
        segment at a time and still writes <image_id>1</image_id> before the second turn's image."""
        from tests.support.samples import CONVERSATIONS, PHOTOS, images_of
        from trainer.data.render import render_sample, to_messages
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        sample = CONVERSATIONS["multi_turn_multi_image_system"]
        r = render_sample(adapter, sample, PHOTOS)
        ref = adapter.processor.apply_chat_template(
            to_messages(sample),
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"images": images_of(sample)},
        )
        assert torch.equal(r.input_ids, ref["input_ids"][0])
        text = adapter.tokenizer.decode(r.input_ids)
        assert text.count("<image_id>0</image_id><image>") == text.count("<image_id>1</image_id><image>") == 1
        assert text.index("<image_id>1</image_id>") > text.index("China.")  # in the second prompt segment
        assert all(torch.equal(r.media[k], ref[k]) for k in ("pixel_values", "target_sizes"))

    def test_small_images_are_upscaled_and_large_ones_capped_at_nine_slices(self, path) -> None:
        from PIL import Image
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        for size in [(64, 64), (100, 300), (2000, 1000), (4000, 400)]:  # width x height
            image = Image.new("RGB", size, (90, 120, 200))
            out = proc(text=["<|image_pad|>"], images=[image], return_tensors="pt")
            assert out["target_sizes"].tolist() == [list(v) for v in views(size[1], size[0])], size
            assert int((out["input_ids"] == proc.image_token_id).sum()) == tokens(size[1], size[0])
            assert len(out["target_sizes"]) <= 1 + MAX_SLICES
        assert views(64, 64) == [(32, 32)]  # 64 x 64 px upscaled to 448 x 448: 64 tokens
        assert slice_grid(1000, 2000) == (2, 4) and slice_grid(400, 4000) == (1, 9)

    def test_the_4x_mode_counts_four_times_the_tokens_and_runs_the_model_in_it(self, path, tmp_path) -> None:
        """downsample_mode "4x" in processor_config.json (both processors): 4x the tokens, and the model
        mmloom builds encodes at 4x (config.json still says 16x), exported as such."""
        from tests.support.samples import CONVERSATIONS, PHOTOS, images_of
        from trainer.data.packing import collate
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        four = tmp_path / "4x"
        shutil.copytree(path, four)
        config = json.loads((four / "processor_config.json").read_text())
        for part in ("image_processor", "video_processor"):
            config[part]["downsample_mode"] = "4x"
        (four / "processor_config.json").write_text(json.dumps(config))
        adapter = get_adapter(four)
        sample = CONVERSATIONS["single"]
        r = render_sample(adapter, sample, PHOTOS)
        (photo,) = images_of(sample)
        count = int((r.input_ids == adapter.config.image_token_id).sum())
        # At 4x views round to 28 px: china's source view is 26 x 40 patches (28 x 40 at 16x).
        assert count == tokens(photo.height, photo.width, "4x") == 764
        model = adapter.load_model(dtype=torch.float32).eval()
        assert model.config.downsample_mode == "4x" and adapter.config.downsample_mode == "16x"
        with torch.no_grad():
            loss = model(**collate(adapter, [r]).inputs, use_cache=False).loss
        assert torch.isfinite(loss)
        model.save_pretrained(tmp_path / "export")
        saved = json.loads((tmp_path / "export" / "config.json").read_text())
        assert saved["downsample_mode"] == "4x" and saved["architectures"] == [
            "MiniCPMV4_6ForConditionalGeneration"
        ]

    # --- the model -----------------------------------------------------------------------------------

    def test_linear_attention_keeps_packed_samples_apart_only_when_prepared(self, path) -> None:
        """transformers' Gated DeltaNet on CPU refuses a pack's boundaries and, without them, carries its
        state and convolution over the whole row; the model mmloom builds loses the per-sample sum."""
        from tests.support.samples import PHOTOS, SAMPLES, summed_loss
        from trainer.data.packing import PACKED_KWARGS, collate
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        assert adapter.packs_isolated
        rendered = [render_sample(adapter, s, PHOTOS) for s in SAMPLES]
        raw = (
            adapter.auto_class().from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
        )
        prepared = adapter.load_model(dtype=torch.float32, attn_implementation="sdpa").eval()
        pack = dict(collate(adapter, rendered).inputs)
        unbounded = {k: v for k, v in pack.items() if k not in PACKED_KWARGS}
        with torch.no_grad():
            with pytest.raises(ValueError, match="can't keep packed sequences apart"):
                summed_loss(raw, dict(pack))
            alone = sum(summed_loss(prepared, dict(collate(adapter, [r]).inputs)) for r in rendered)
            leaked = summed_loss(raw, unbounded)
            packed = summed_loss(prepared, dict(pack))
        assert abs(leaked.item() - alone.item()) > 1e-4 * abs(alone.item())
        assert abs(packed.item() - alone.item()) <= 1e-6 * abs(alone.item())

    def test_forward_projects_only_the_positions_kept(self, path) -> None:
        from tests.support.samples import PHOTOS, SAMPLES
        from trainer.data.packing import collate
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        model = adapter.load_model(dtype=torch.float32).eval()
        inputs = dict(collate(adapter, [render_sample(adapter, SAMPLES[0], PHOTOS)]).inputs)
        inputs.pop("labels")
        keep = torch.tensor([3, 7, 20])
        with torch.no_grad():
            full = model(**inputs, use_cache=False).logits
            kept = model(**inputs, use_cache=False, logits_to_keep=keep).logits
            last = model(**inputs, use_cache=False, logits_to_keep=1).logits
        assert full.shape[1] == inputs["input_ids"].shape[1] and kept.shape[1] == 3
        assert torch.allclose(kept, full[:, keep], atol=1e-6) and torch.allclose(
            last, full[:, -1:], atol=1e-6
        )
        assert type(model).__name__ == "MiniCPMV4_6ForConditionalGeneration"

    def test_videos_join_the_images_in_one_tower_call(self, path) -> None:
        """A pack holding images and videos: one call of the vision tower, the video views among the
        image views in the order of their tokens, video tokens relabelled; the logits of the model's own
        two calls."""
        from data_tools.video import VideoPolicy
        from tests.support.samples import SAMPLES
        from trainer.data.packing import collate
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        adapter, members = get_adapter(path), video_members()
        rendered = [
            render_sample(adapter, s, members, video=VideoPolicy())
            for s in (SAMPLES[0], video_sample("v", 4, image=True))
        ]
        pack = collate(adapter, rendered).inputs
        assert "pixel_values_videos" not in pack and "target_sizes_videos" not in pack
        video_id, image_id = adapter.config.video_token_id, adapter.config.image_token_id
        assert not (pack["input_ids"] == video_id).any()
        # Order of views: sample 1's photo (3 views), the video's 4 frames (1 view each), the photo after it.
        assert pack["target_sizes"].tolist() == [[28, 40], [36, 28], [36, 28]] + [[28, 36]] * 4 + [
            [28, 40],
            [36, 28],
            [36, 28],
        ]
        model = adapter.load_model(dtype=torch.float32, attn_implementation="sdpa").eval()
        calls = []
        model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
        inputs = {k: v for k, v in pack.items() if k != "labels"}
        own = {k: v for k, v in collate(adapter, rendered[1:]).inputs.items() if k != "labels"}
        media = rendered[1].media
        own.update(
            input_ids=rendered[1].input_ids[None],
            pixel_values=media["pixel_values"],
            target_sizes=media["target_sizes"],
            pixel_values_videos=media["pixel_values_videos"],
            target_sizes_videos=media["target_sizes_videos"],
        )
        assert (own["input_ids"] == video_id).any() and (own["input_ids"] == image_id).any()
        with torch.no_grad():
            packed = model(**inputs, use_cache=False).logits[0, rendered[0].length :]
            assert len(calls) == 1
            apart = model(**own, use_cache=False).logits[0]
            assert len(calls) == 3  # images and videos: two calls
        assert torch.allclose(packed, apart, atol=1e-5)

    def test_parameter_groups_are_llama_factorys(self, path) -> None:
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        with torch.device("meta"):
            model = adapter.model_from_config()
        groups = {}
        for name, _ in model.named_parameters():
            groups.setdefault(adapter.param_group(name), set()).add(name.split(".")[1])
        assert groups == {"vision": {"vision_tower"}, "projector": {"merger"}, "llm": {"language_model"}}
        assert adapter.param_group("model.vision_tower.vit_merger.linear_1.weight") == "vision"
        assert adapter.param_group("lm_head.weight") == "llm"
        assert adapter.quant_skip_modules() == ["lm_head", "model.vision_tower", "model.merger"]
