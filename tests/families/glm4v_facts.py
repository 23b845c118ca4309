"""What GLM-4.1V and GLM-4.5V checkpoints share, for the test classes of glm4v and glm4v_moe: GLM's chat
format without an end-of-turn token, 14-px patches merged 2x2, videos as timestamped image blocks,
half-rotary 3-D rope; packed positions are the model's own rope index (trainer/models/glm4v.py)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tests.families.oracles import CARPHONE, FamilyOracles, VideoOracles, conversation, packed_video_positions

# OpenAI CLIP's normalisation, the published preprocessor configs' image_mean and image_std.
CLIP_MEAN_STD = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])

GLM_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
]


def grid(height: int, width: int) -> tuple[int, int]:
    """Patch grid of Glm4vImageProcessor: smart_resize with factor 28 (14-px patches, 2x2 merge) of an
    image counted twice (a temporal pair), between the published 112*112 and 9633792 pixels."""
    h, w = round(height / 28) * 28, round(width / 28) * 28
    assert 112 * 112 <= 2 * h * w <= 9633792  # the test images need no rescaling
    return h // 14, w // 14


def video_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Temporal patches and patch grid of Glm4vVideoProcessor: the clip's frames resized together by
    smart_resize with factor 28 between the published 112*112 and 47040000 pixels (frames x height x
    width, the frame count rounded to a pair), 2 frames a temporal patch."""
    h, w, t = round(height / 28) * 28, round(width / 28) * 28, round(frames / 2) * 2
    if t * h * w > 47040000:
        beta = math.sqrt(frames * height * width / 47040000)
        h, w = max(28, math.floor(height / beta / 28) * 28), max(28, math.floor(width / beta / 28) * 28)
    elif t * h * w < 112 * 112:
        beta = math.sqrt(112 * 112 / (frames * height * width))
        h, w = math.ceil(height * beta / 28) * 28, math.ceil(width * beta / 28) * 28
    return math.ceil(frames / 2), h // 14, w // 14


def video_spans(ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """True for the tokens between <|begin_of_video|> and <|end_of_video|>."""
    begin, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|begin_of_video|>", "<|end_of_video|>"))
    return torch.cumsum(ids == begin, -1) > torch.cumsum(ids == end, -1)


class GlmVFacts(VideoOracles, FamilyOracles):
    """GLM's format: "[gMASK]<sop>", role tags, no end-of-turn token (the model stops by generating
    <|user|>). TRAINING_RENDER: conversation() as mmloom renders it (the adapter's template changes)."""

    TOKENIZER_ROLES = (None, "<|endoftext|>", "<|endoftext|>", False)
    GENERATION_PROMPT = "<|assistant|>\n"
    TRAINING_RENDER: ClassVar[str]

    def expected_image_tokens(self, image) -> int:
        gh, gw = grid(image.size[1], image.size[0])
        return gh * gw // 4

    def expected_video_tokens(self, frames: int, height: int, width: int) -> int:
        t, gh, gw = video_grid(frames, height, width)
        return t * gh * gw // 4

    def video_tokens(self, adapter: Any, input_ids: torch.Tensor) -> int:
        """GLM writes video frames as image tokens: those inside a video span."""
        image = input_ids == adapter.tokenizer.convert_tokens_to_ids("<|image|>")
        return int((image & video_spans(input_ids, adapter.tokenizer)).sum())

    def inference_loss(self, model: Any, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """The model on what the processor gives at inference. Given images and a video together,
        transformers' forward writes the images' features into every <|image|> position, the video
        frames' too, and fails (test_the_model_alone_fails_on_images_with_a_video); the reference then
        encodes them apart with the model's own get_image_features / get_video_features, places them
        by the processor's mm_token_type_ids (1 image, 2 video) and takes the model's own rope index."""
        if "pixel_values" not in inputs or "pixel_values_videos" not in inputs:
            return super().inference_loss(model, inputs, labels)
        m, ids, kinds = model.model, inputs["input_ids"], inputs["mm_token_type_ids"]
        images = torch.cat(
            m.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        )
        videos = torch.cat(
            m.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        )
        embeds = m.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((kinds == 1)[..., None], images)
        embeds = embeds.masked_scatter((kinds == 2)[..., None], videos)
        grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw")}
        rope, _ = m.get_rope_index(ids, kinds, **grids)
        logits = model(inputs_embeds=embeds, position_ids=rope, use_cache=False).logits[0]
        return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="sum")

    def check_geometry(self, config, processor) -> None:
        vision, text = config.vision_config, config.text_config
        assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
        assert vision.image_size == 336  # the learned position grid, 24 x 24, resampled to every image
        assert vision.out_hidden_size == text.hidden_size
        assert vision.intermediate_size == text.intermediate_size  # the projector's width, as published
        rope = text.rope_parameters
        assert rope["rope_theta"] == 10000 and rope["partial_rotary_factor"] == 0.5
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        assert sum(rope["mrope_section"]) == head_dim // 4  # frequency pairs of the rotated half
        assert [s * 128 // head_dim for s in rope["mrope_section"]] == [8, 12, 12]  # head_dim 128, scaled
        assert text.max_position_embeddings == 65536 and text.rms_norm_eps == 1e-5
        ids = processor.tokenizer.convert_tokens_to_ids
        assert text.eos_token_id == [ids("<|endoftext|>"), ids("<|user|>"), ids("<|observation|>")]
        assert text.pad_token_id == ids("<|endoftext|>")
        assert (config.image_token_id, config.video_token_id) == (ids("<|image|>"), ids("<|video|>"))
        assert (config.image_start_token_id, config.image_end_token_id) == (
            ids("<|begin_of_image|>"),
            ids("<|end_of_image|>"),
        )
        assert (config.video_start_token_id, config.video_end_token_id) == (
            ids("<|begin_of_video|>"),
            ids("<|end_of_video|>"),
        )
        assert not config.tie_word_embeddings
        assert type(processor).__name__ == "Glm4vProcessor"
        images, videos = processor.image_processor, processor.video_processor
        assert images.size == {"shortest_edge": 12544, "longest_edge": 9633792}
        assert videos.size == {"shortest_edge": 12544, "longest_edge": 47040000} and videos.fps == 2
        for p in (images, videos):
            assert (p.patch_size, p.temporal_patch_size, p.merge_size) == (14, 2, 2)
            assert (list(p.image_mean), list(p.image_std)) == CLIP_MEAN_STD

    def check_real_images(self, out, processor) -> None:
        assert out["image_grid_thw"].tolist() == [[1, 36, 36], [1, 30, 46]]
        assert out["pixel_values"].shape == (36 * 36 + 30 * 46, 3 * 2 * 14 * 14)
        assert out["mm_token_type_ids"].max() == 1  # images only

    def test_mmloom_renders_text_content_and_ends_every_answer_with_user(self, path) -> None:
        """What the adapter changes (trainer/models/glm4v.py): typed content as text and a final
        <|user|>, rendered through the adapter's processor; the checkpoint's template itself, which
        export saves, stays as published."""
        from transformers import AutoProcessor

        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        assert adapter.processor.apply_chat_template(conversation()) == self.TRAINING_RENDER
        published = AutoProcessor.from_pretrained(path)
        assert adapter.processor.chat_template == published.chat_template
        assert published.apply_chat_template(conversation()) == self.FULL_RENDER
        prompt = adapter.processor.apply_chat_template(conversation()[:4], add_generation_prompt=True)
        assert prompt == self.TRAINING_RENDER[: len(prompt)] and prompt.endswith(self.GENERATION_PROMPT)

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

    def test_packed_video_positions_are_the_models_rope_and_timestamps_the_clips(self, path) -> None:
        """6 of the carphone clip's 120 frames (29.97 fps): 3 temporal patches of 10 x 12 patches, each an
        image block followed by the time of its first frame in whole seconds, all inside one video block;
        time advances through that text, so every patch's temporal rope row starts at its text position."""
        from data_tools.video import VideoPolicy, decode_video

        adapter, r, positions, ref = packed_video_positions(path)
        clip = decode_video(CARPHONE.read_bytes(), VideoPolicy(), 6)
        assert clip.indices == [0, 24, 48, 71, 95, 119]
        seconds = [int(t) for t in clip.timestamps[::2]]
        assert seconds == [0, 1, 3]
        text = adapter.tokenizer.decode(r.input_ids)
        frames = "".join(f"<|begin_of_image|>{'<|image|>' * 30}<|end_of_image|>{s}" for s in seconds)
        assert f"<|begin_of_video|>{frames}<|end_of_video|>" in text
        assert ref["video_grid_thw"].tolist() == [[3, 10, 12]]
        ids = r.input_ids
        frame_tokens = (ids == adapter.config.image_token_id) & video_spans(ids, adapter.tokenizer)
        starts = (ids == adapter.config.image_start_token_id) & video_spans(ids, adapter.tokenizer)
        for begin, t in zip(starts.nonzero().flatten().tolist(), positions[1, frame_tokens].view(3, 30)):
            assert t.unique().tolist() == [int(positions[1, begin]) + 1]  # right after <|begin_of_image|>

    def test_the_model_alone_fails_on_images_with_a_video(self, path) -> None:
        """transformers 5.25: Glm4vModel.get_placeholder_mask gives images and videos the same mask (every
        <|image|>), so a sequence with both fails; mmloom hands videos to the model as images
        (Glm4vAdapter.videos_as_images). If this starts to pass, that workaround may go."""
        import pytest
        from transformers import AutoModelForImageTextToText

        from data_tools.video import VideoPolicy
        from tests.families.oracles import inference, video_members, video_sample
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        inputs = inference(adapter, video_sample("w", 4, image=True), video_members(), VideoPolicy())
        with torch.no_grad(), pytest.raises(ValueError, match="Image features and image tokens do not match"):
            model(**inputs, use_cache=False)

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
        assert r.media["video_grid_thw"].tolist() == [[1, 6, 8]]  # 48 x 64, scaled up to 84 x 112
        assert adapter.tokenizer.decode(r.input_ids).count("<|end_of_image|>0<|end_of_video|>") == 1
