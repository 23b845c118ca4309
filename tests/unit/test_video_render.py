"""Videos for families that take frames as images (the Phi3-Vision approach; llava here): the
sampled frames become that many images in place of the video, a sample's num_frames is honoured,
and the rendering is the processor's own for those images."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from data_tools.sample import Sample, TextPart, Turn, VideoPart
from data_tools.video import VideoPolicy, decode_video
from tests.support import family_params
from trainer.data.render import IGNORE, RenderError, render_sample, to_messages
from trainer.models.registry import get_adapter, load_families


def video_sample(num_frames: int | None) -> Sample:
    part = VideoPart(
        member="v.mp4",
        width=176,
        height=144,
        frames=120,
        fps=29.97,
        duration=4.0,
        format="mp4",
        bytes=0,
        num_frames=num_frames,
    )
    return Sample(
        key="000000007",
        source="s",
        index=7,
        turns=[
            Turn(role="user", parts=[part, TextPart(text="What happens?")]),
            Turn(role="assistant", parts=[TextPart(text="A man talks on a phone.")]),
        ],
    )


@pytest.mark.parametrize("num_frames, expected", [(None, 2), (3, 3)])
def test_frames_become_images_as_the_processor_renders_them(tiny, media, num_frames, expected: int) -> None:
    adapter = get_adapter(tiny("llava"))
    assert adapter.video == "frames"
    data = media["carphone.mp4"].read_bytes()
    policy = VideoPolicy(num_frames=2)
    sample = video_sample(num_frames)
    r = render_sample(adapter, sample, {"v.mp4": data}, video=policy)
    image_id = adapter.config.image_token_id
    assert int((r.input_ids == image_id).sum()) == expected * 576
    assert r.media["pixel_values"].shape[0] == expected

    clip = decode_video(data, policy, num_frames)
    frames = [Image.fromarray(f) for f in clip.frames]
    messages = to_messages(sample, [len(frames)])
    assert [c["type"] for c in messages[0]["content"]] == ["image"] * expected + ["text"]
    ref = adapter.processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs={"images": frames}
    )
    assert torch.equal(r.input_ids[: ref["input_ids"].shape[1]], ref["input_ids"][0])
    assert torch.equal(r.media["pixel_values"], ref["pixel_values"])
    labelled = adapter.tokenizer.decode(r.input_ids[r.labels != IGNORE])
    assert labelled.strip() == "A man talks on a phone.</s>"


def test_an_undecodable_video_is_a_counted_skip(tiny, media) -> None:
    adapter = get_adapter(tiny("llava"))
    with pytest.raises(RenderError) as e:
        render_sample(adapter, video_sample(None), {"v.mp4": media["truncated.mp4"].read_bytes()})
    assert e.value.reason == "bad_video" and "v.mp4" in e.value.detail


def test_a_video_too_long_for_the_pack_is_dropped(tiny, media) -> None:
    adapter = get_adapter(tiny("llava"))
    with pytest.raises(RenderError) as e:
        render_sample(
            adapter, video_sample(8), {"v.mp4": media["carphone.mp4"].read_bytes()}, max_tokens=4096
        )
    assert e.value.reason == "too_long"


FRAME_FAMILIES = sorted(f for f, cls in load_families().items() if cls.video == "frames")


@pytest.mark.parametrize("family", family_params(FRAME_FAMILIES))
def test_every_frames_family_renders_a_video_as_the_processor_renders_its_frames(
    tiny, media, family: str
) -> None:
    adapter = get_adapter(tiny(family))
    data = media["carphone.mp4"].read_bytes()
    policy = VideoPolicy(num_frames=2)
    sample = video_sample(None)
    r = render_sample(adapter, sample, {"v.mp4": data}, video=policy)
    frames = [Image.fromarray(f) for f in decode_video(data, policy).frames]
    messages = to_messages(sample, [len(frames)])
    prompt = adapter.processor.apply_chat_template(
        messages[:1],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"images": frames},
    )["input_ids"][0]
    assert torch.equal(r.input_ids[: len(prompt)], prompt)
    assert (
        adapter.tokenizer.decode(r.input_ids[r.labels != IGNORE])
        .strip()
        .startswith("A man talks on a phone.")
    )
