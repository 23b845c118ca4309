"""What Qwen3.5 checkpoints share, for the test classes of qwen3_5 and qwen3_5_moe: Qwen3-VL's processor
(16-px patches merged 2x2, timestamped video blocks), the published thinking chat template and the
adapter's training version of it, interleaved 3-D rope over a quarter of each head, and a hybrid
language model whose Gated DeltaNet layers must not carry one packed sample into the next."""

from __future__ import annotations

import math

import pytest
import torch

from tests.families.oracles import CARPHONE, FamilyOracles, VideoOracles, conversation, packed_video_positions


def grid(height: int, width: int) -> tuple[int, int]:
    """Patch grid from smart_resize with factor 32 (16-px patches, 2x2 merge) and the published pixel
    limits, min 256*256 and max 4096*4096 (preprocessor_config.json: 65536 and 16777216)."""
    h, w = round(height / 32) * 32, round(width / 32) * 32
    assert 256 * 256 <= h * w <= 4096 * 4096  # the test images need no rescaling
    return h // 16, w // 16


def video_tokens(frames: int, height: int, width: int) -> int:
    """Video tokens of Qwen3.5 (Qwen3-VL's video processor): 2 frames a temporal patch, the clip resized
    by its smart_resize with factor 32 over all its frames (video_preprocessor_config.json: min 64*64,
    max 24*1024*1024 pixels; per frame at most 768 tokens' worth, the qwen-vl-utils cap), 2x2 patches
    of 16 px merged into a token."""
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


EMPTY_THINK = "<think>\n\n</think>\n\n"


class Qwen3_5Facts(VideoOracles, FamilyOracles):
    """The oracles' chat facts are those of the processor mmloom renders with: the adapter's, whose
    template (trainer/models/qwen3_5.py's training_template) answers without thinking by default and
    keeps every answer's think block. The published template itself is pinned by the tests below."""

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
    FULL_RENDER = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is this?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        f"<|im_start|>assistant\n{EMPTY_THINK}An astronaut.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>And this?<|im_end|>\n"
        f"<|im_start|>assistant\n{EMPTY_THINK}A palace.<|im_end|>\n"
    )
    GENERATION_PROMPT = f"<|im_start|>assistant\n{EMPTY_THINK}"
    ASSISTANT_TEXT = "An astronaut.<|im_end|>A palace.<|im_end|>"
    TEXT_ONLY_RENDER = (
        f"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n{EMPTY_THINK}Hello.<|im_end|>\n"
        f"<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n{EMPTY_THINK}"
    )
    # The published 27B / 35B-A3B heads the tiny keeps the ratios of: (query, key-value) and Gated
    # DeltaNet (key, value).
    ATTENTION_HEADS: tuple[int, int]
    LINEAR_HEADS: tuple[int, int]

    def expected_image_tokens(self, image) -> int:
        gh, gw = grid(image.size[1], image.size[0])
        return gh * gw // 4

    def expected_video_tokens(self, frames: int, height: int, width: int) -> int:
        return video_tokens(frames, height, width)

    def check_geometry(self, config, processor) -> None:
        vision, text = config.vision_config, config.text_config
        assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (16, 2, 2)
        assert vision.num_position_embeddings == 48 * 48
        assert vision.out_hidden_size == text.hidden_size
        assert "deepstack_visual_indexes" not in vision.to_dict()  # no DeepStack, unlike Qwen3-VL
        # 3 Gated DeltaNet layers then a full-attention one in the real models; one of each, in that order.
        assert text.layer_types == ["linear_attention", "full_attention"]
        assert text.linear_conv_kernel_dim == 4
        heads, kv = self.ATTENTION_HEADS
        assert text.num_attention_heads * kv == text.num_key_value_heads * heads
        keys, values = self.LINEAR_HEADS
        assert text.linear_num_value_heads * keys == text.linear_num_key_heads * values
        rope = text.rope_parameters
        assert rope["mrope_interleaved"] and rope["rope_theta"] == 10000000
        assert text.head_dim == 256 and rope["partial_rotary_factor"] == 0.25
        assert rope["mrope_section"] == [11, 11, 10]  # 64 rotary dims of 256: 32 frequencies
        assert type(processor).__name__ == "Qwen3VLProcessor"
        assert processor.image_processor.size == {"shortest_edge": 65536, "longest_edge": 16777216}
        assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
        assert processor.video_processor.size == {"shortest_edge": 4096, "longest_edge": 25165824}
        assert (processor.image_processor.merge_size, processor.video_processor.merge_size) == (2, 2)

    def check_real_images(self, out, processor) -> None:
        assert out["image_grid_thw"].tolist() == [[1, 32, 32], [1, 26, 40]]
        assert out["pixel_values"].shape == (32 * 32 + 26 * 40, 3 * 2 * 16 * 16)

    # --- the chat template -------------------------------------------------------------------------

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
        test_the_published_template_drops_earlier_think_blocks), from the first user turn on: Qwen3.5's
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
        """The checkpoint's own template: thinking by default, a think block only on answers after the
        last user query, reasoning split off an answer's "</think>"; so a conversation's head is no
        prefix of the conversation."""
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        messages = conversation()
        full = proc.apply_chat_template(messages)
        assert full == self.FULL_RENDER.replace(EMPTY_THINK + "An astronaut.", "An astronaut.")
        head = proc.apply_chat_template(messages[:3])
        assert head.endswith(f"<|im_start|>assistant\n{EMPTY_THINK}An astronaut.<|im_end|>\n")
        assert not full.startswith(head)
        prompt = proc.apply_chat_template(messages[:2], add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n<think>\n")
        off = proc.apply_chat_template(messages[:2], add_generation_prompt=True, enable_thinking=False)
        assert off == prompt + "\n</think>\n\n"
        reasoned = [
            *messages[:4],
            {"role": "assistant", "content": "<think>\nA dome.\n</think>\n\nA palace."},
        ]
        assert proc.apply_chat_template(reasoned).endswith(
            "<|im_start|>assistant\n<think>\nA dome.\n</think>\n\nA palace.<|im_end|>\n"
        )
        earlier = [*reasoned, {"role": "user", "content": "Sure?"}]
        assert "<|im_start|>assistant\nA palace.<|im_end|>" in proc.apply_chat_template(earlier)
        with pytest.raises(Exception, match="System message cannot contain images"):
            proc.apply_chat_template([{"role": "system", "content": [{"type": "image"}]}, *messages[1:]])

    def test_the_adapters_template_is_made_once_and_still_thinks_on_request(self, path) -> None:
        from trainer.models.qwen3_5 import training_template
        from trainer.models.registry import get_adapter

        proc = get_adapter(path).processor
        assert training_template(proc.chat_template) == proc.chat_template  # an mmloom export is kept
        messages = conversation()
        prompt = proc.apply_chat_template(messages[:2], add_generation_prompt=True, enable_thinking=True)
        assert prompt.endswith("<|im_start|>assistant\n<think>\n")
        assert proc.apply_chat_template(messages[:3]).startswith(prompt)

    def test_an_answer_with_its_own_reasoning_is_a_counted_skip(self, path) -> None:
        from tests.support.samples import PHOTOS, sample
        from trainer.data.render import RenderError, render_sample
        from trainer.models.registry import get_adapter

        reasoned = sample("r", [("user", ["Why?"]), ("assistant", ["<think>\nBecause.\n</think>\n\nSo."])])
        with pytest.raises(RenderError) as e:
            render_sample(get_adapter(path), reasoned, PHOTOS)
        assert e.value.reason == "template_not_prefix_consistent"

    # --- packing through the linear-attention layers -----------------------------------------------

    def test_packs_and_every_linear_attention_layer_runs_per_sample(self, path) -> None:
        """The family packs; the generic adapter of the same checkpoint still refuses to (it does not
        know the layers). The full-attention layers take the trainer's packed backend."""
        from trainer import attention
        from trainer.linear_attention import PerSample
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        assert adapter.packs_isolated and not get_adapter(path, family="generic").packs_isolated
        assert adapter.attn_implementation() == attention.per_module(adapter.config, attention.PACKED)
        model = adapter.load_model(dtype=torch.float32)
        layers = [m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")]
        assert len(layers) == 1 and all(isinstance(m, PerSample) for m in layers)
        assert adapter.prepare(model) is model and sum(isinstance(m, PerSample) for m in model.modules()) == 1

    def test_packed_positions_and_logits_are_the_models_own(self, path) -> None:
        """Two samples with images packed: the positions are, per sample, text positions restarting at 0
        over the model's own get_rope_index of what the processor gives at inference, and each sample's
        logits in the pack equal the model's on that sample alone (the second one's too: its Gated
        DeltaNet layer starts from zeros)."""
        adapter, samples, rendered, pack = packed_pair(path)
        model = adapter.load_model(dtype=torch.float32, attn_implementation="sdpa").eval()
        with torch.no_grad():
            packed = model(**{k: v for k, v in pack.items() if k != "labels"}, use_cache=False).logits[0]
        start = 0
        for sample, r in zip(samples, rendered):
            ref = inference(adapter, sample)
            assert torch.equal(ref["input_ids"][0], r.input_ids)
            rope, _ = model.model.get_rope_index(
                ref["input_ids"], ref["mm_token_type_ids"], image_grid_thw=ref["image_grid_thw"]
            )
            positions = pack["position_ids"][:, 0, start : start + r.length]
            assert torch.equal(positions[0], torch.arange(r.length))
            assert torch.equal(positions[1:], rope[:, 0])
            with torch.no_grad():
                alone = model(**ref, use_cache=False).logits[0]
            assert torch.allclose(packed[start : start + r.length], alone, atol=1e-4, rtol=1e-4)
            start += r.length

    def test_without_per_sample_layers_the_second_sample_reads_the_first(self, path) -> None:
        """The model as transformers builds it, not prepared by the adapter: with the pack's boundaries its
        torch fallback refuses the pack; with restarting positions alone (what packing does for
        attention-only models) the first sample's logits are its own, the second's are not. In the first
        layer (whose input is each token's embedding) the second sample's linear-attention output
        differs from its first token on, and past the convolution's window too: the recurrent state
        carries the first sample over, not only the convolution."""
        from transformers import AutoModelForImageTextToText

        from trainer.data.packing import PACKED_KWARGS

        adapter, samples, rendered, pack = packed_pair(path)
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sdpa"
        )
        model.eval()
        inputs = {k: v for k, v in pack.items() if k != "labels"}
        with torch.no_grad(), pytest.raises(ValueError, match="packed sequences"):
            model(**inputs, use_cache=False)
        layer = model.model.language_model.layers[0].linear_attn
        outputs = []
        hook = layer.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
        positions_only = {k: v for k, v in inputs.items() if k not in PACKED_KWARGS}
        with torch.no_grad():
            packed = model(**positions_only, use_cache=False).logits[0]
            alone = [model(**inference(adapter, s), use_cache=False).logits[0] for s in samples]
        hook.remove()
        first = rendered[0].length
        assert torch.allclose(packed[:first], alone[0], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(packed[first:], alone[1], atol=1e-2, rtol=1e-2)
        gap = (outputs[0][first:] - outputs[2]).abs().amax(dim=-1)
        window = model.config.text_config.linear_conv_kernel_dim - 1  # earlier tokens the convolution sees
        assert gap[0] > 0.1 and gap[window:].max() > 0.1, gap[: 2 * window]

    def test_activation_checkpointing_keeps_the_per_sample_gradients(self, path) -> None:
        """Recomputed in backward (train.activation_checkpointing=full), the per-sample layers give the
        same loss and gradients, and no gradient reaches one packed sample from another's loss."""
        from trainer.parallel import apply_activation_checkpointing, unwrapped_name

        adapter, _, rendered, pack = packed_pair(path)
        grads = []
        for mode in ("none", "full"):
            model = adapter.load_model(dtype=torch.float32, attn_implementation="sdpa")
            apply_activation_checkpointing(model, mode)
            model.train()
            inputs = dict(pack)
            labels = torch.full_like(inputs["labels"], -100)
            second = slice(rendered[0].length, rendered[0].length + rendered[1].length)
            labels[0, second] = inputs["labels"][0, second]
            captured = {}

            def keep(module, args, output, captured=captured):
                output.retain_grad()
                captured["embeds"] = output

            hook = model.get_input_embeddings().register_forward_hook(keep)
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits[0]
            loss = torch.nn.functional.cross_entropy(logits[:-1], labels[0, 1:], ignore_index=-100)
            loss.backward()
            hook.remove()
            embeds = captured["embeds"].grad[0].abs().sum(-1)
            assert (
                embeds[second].sum() > 0 and embeds[: second.start].sum() == embeds[second.stop :].sum() == 0
            )
            grads.append(
                {unwrapped_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
            )
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name

    # --- video ---------------------------------------------------------------------------------------

    def test_packed_video_positions_are_the_models_rope_and_timestamps_the_clips(self, path) -> None:
        """6 of the carphone clip's 120 frames (29.97 fps): 3 temporal patches, each its own vision block
        after "<t seconds>", t the mean time of its two frames in the video."""
        from data_tools.video import VideoPolicy, decode_video

        adapter, r, _, ref = packed_video_positions(path)
        clip = decode_video(CARPHONE.read_bytes(), VideoPolicy(), 6)
        times = [(a + b) / 2 for a, b in zip(clip.timestamps[::2], clip.timestamps[1::2])]
        text = adapter.tokenizer.decode(r.input_ids)
        blocks = "".join(
            f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * 24 + "<|vision_end|>" for t in times
        )
        assert blocks in text and [f"{t:.1f}" for t in times] == ["0.4", "2.0", "3.6"]
        assert ref["video_grid_thw"].tolist() == [[3, 8, 12]]


def inference(adapter, sample) -> dict:
    """What the adapter's processor gives at inference for `sample`'s whole conversation."""
    from tests.support.samples import images_of
    from trainer.data.render import to_messages

    return adapter.processor.apply_chat_template(
        to_messages(sample),
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"images": images_of(sample)},
    )


def packed_pair(path):
    """(adapter, two samples with images, the samples rendered, their pack's model inputs): one image,
    then two images and a system prompt."""
    from tests.support.samples import PHOTOS, SAMPLES
    from trainer.data.packing import collate
    from trainer.data.render import render_sample
    from trainer.models.registry import get_adapter

    adapter = get_adapter(path)
    samples = [SAMPLES[0], SAMPLES[2]]
    rendered = [render_sample(adapter, s, PHOTOS) for s in samples]
    pack = collate(adapter, rendered).inputs
    assert pack["position_ids"].shape == (4, 1, sum(r.length for r in rendered))
    return adapter, samples, rendered, pack
