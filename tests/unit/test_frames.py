"""Frames extracted at conversion (data_tools/frames.py): the converter samples the frames training
would decode, stores them as images, and training turns them back into the same Clip; a sample's
num_frames wins; a missing or corrupt frame is a bad_video skip, never a crash."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from data_tools.conversion import ConvertOptions, convert_record
from data_tools.frames import FrameExtraction, extract_frames, stored_clip
from data_tools.sample import Rejected, Sample, TextPart, Turn, VideoPart
from data_tools.video import VideoPolicy, decode_video, frame_indices
from trainer.data.render import RenderError, render_sample


def convert(media: dict[str, Path], name: str, how: FrameExtraction | None, num_frames: int | None = None):
    record = {
        "id": name,
        "video": str(media[name]),
        "conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"},
            {"from": "gpt", "value": "Things move."},
        ],
    }
    if num_frames is not None:
        record["num_frames"] = num_frames
    out = convert_record(0, 1, record, "s", media[name].parent, ConvertOptions(video_frames=how))
    assert out.members is not None, out.reason
    return Sample.from_json(out.members[0][1]), dict(out.members[1:]), out


@pytest.mark.parametrize(
    "name, num_frames",
    [("carphone.mp4", None), ("bikes.mp4", 6), ("vfr.mp4", 5), ("short.mp4", 8), ("one_frame.mp4", None)],
)
def test_stored_frames_are_the_frames_training_decodes(media, name: str, num_frames: int | None) -> None:
    how = FrameExtraction(num_frames=4, format="png")
    sample, members, out = convert(media, name, how, num_frames)
    part = sample.media[0]
    assert isinstance(part, VideoPart) and part.num_frames == num_frames
    data = media[name].read_bytes()
    clip = decode_video(data, VideoPolicy(num_frames=4), num_frames)  # what training would decode
    n = len(clip.indices)
    assert n == min(num_frames or 4, part.frames)
    assert part.frame_members == [f"vid0.frame{j}.png" for j in range(n)] and part.member == "vid0.frame0.png"
    assert list(members) == part.frame_members and out.frames == n and out.videos == 1  # no video member
    assert (
        part.frame_indices
        == clip.indices
        == frame_indices(clip.total_frames, clip.fps, VideoPolicy(num_frames=4), num_frames)
    )
    assert (part.source_fps, part.source_frames) == (clip.fps, clip.total_frames)
    assert part.frame_timestamps == [round(t, 6) for t in clip.timestamps]
    assert (part.bytes, part.format, part.origin) == (len(data), "mp4", str(media[name]))  # the video's own
    back = stored_clip(part, members)
    assert np.array_equal(back.frames, clip.frames)  # PNG: the decoded pixels exactly
    assert (back.indices, back.fps, back.total_frames) == (clip.indices, clip.fps, clip.total_frames)
    assert back.timestamps == clip.timestamps and back.sample_fps == clip.sample_fps


def test_jpeg_frames_are_close_and_deterministic(media) -> None:
    how = FrameExtraction(num_frames=3)
    sample, members, _ = convert(media, "carphone.mp4", how)
    part = sample.media[0]
    assert part.frame_members == ["vid0.frame0.jpg", "vid0.frame1.jpg", "vid0.frame2.jpg"]
    assert all(Image.open(io.BytesIO(members[m])).format == "JPEG" for m in part.frame_members)
    clip = decode_video(media["carphone.mp4"].read_bytes(), how.policy())
    back = stored_clip(part, members)
    assert back.frames.shape == clip.frames.shape == (3, 144, 176, 3)
    assert np.abs(back.frames.astype(int) - clip.frames.astype(int)).mean() < 3  # quality 95
    assert convert(media, "carphone.mp4", how)[1] == members  # same video, same bytes


def test_fps_policy_and_the_max_frames_cap(media) -> None:
    how = FrameExtraction(fps=2.0, min_frames=3, max_frames=10)
    policy = VideoPolicy(fps=2.0, min_frames=3, max_frames=10)
    for name, expected in [("bikes.mp4", 10), ("carphone.mp4", 8), ("short.mp4", 3), ("one_frame.mp4", 1)]:
        part = convert(media, name, how)[0].media[0]
        assert len(part.frame_indices) == expected, name
        assert part.frame_indices == frame_indices(part.source_frames, part.source_fps, policy)
    # A sample's num_frames wins over the policy, within max_frames, as at training time.
    assert len(convert(media, "bikes.mp4", how, num_frames=40)[0].media[0].frame_indices) == 10


def test_settings_are_checked() -> None:
    for bad in [
        {},
        {"num_frames": 4, "fps": 1.0},
        {"num_frames": 0},
        {"fps": -1.0},
        {"num_frames": 4, "min_frames": 5, "max_frames": 4},
        {"num_frames": 4, "format": "gif"},
    ]:
        with pytest.raises(ValueError):
            FrameExtraction(**bad)
    assert FrameExtraction(num_frames=8).policy() == VideoPolicy(num_frames=8)
    assert "PNG" in FrameExtraction(fps=1.0, format="png").describe()


def test_a_video_whose_frames_do_not_decode_is_rejected(media) -> None:
    with pytest.raises(Rejected) as e:
        extract_frames(media["garbage_frames.mp4"].read_bytes(), "g.mp4", FrameExtraction(num_frames=4))
    assert e.value.code == "undecodable_video" and "g.mp4" in e.value.reason
    record = {
        "video": str(media["audio_only.m4a"]),
        "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "a"}],
    }
    out = convert_record(
        0,
        1,
        record,
        "s",
        media["audio_only.m4a"].parent,
        ConvertOptions(video_frames=FrameExtraction(num_frames=4)),
    )
    assert out.code == "no_video_stream" and "audio only" in (out.reason or "")


def capture_clip(sample: Sample, members: dict[str, bytes], policy: VideoPolicy):
    """The Clip render_sample hands a native-video family (adapter.video_input)."""
    seen = []

    class Seen(Exception):
        pass

    def video_input(clip):
        seen.append(clip)
        raise Seen

    adapter = SimpleNamespace(video="native", family="native", video_input=video_input)
    with pytest.raises(Seen):
        render_sample(adapter, sample, members, video=policy)  # type: ignore[arg-type]
    return seen[0]


def test_render_gives_native_families_the_clip_decoding_would(media) -> None:
    sample, members, _ = convert(media, "vfr.mp4", FrameExtraction(num_frames=5, format="png"), num_frames=4)
    video_sample, video_members, _ = convert(media, "vfr.mp4", None, num_frames=4)
    assert video_sample.media[0].member == "vid0.mp4" and video_sample.media[0].frame_members is None
    # The training-time policy is ignored for stored frames (their indices are fixed at conversion) ...
    from_frames = capture_clip(sample, members, VideoPolicy(num_frames=2))
    decoded = capture_clip(video_sample, video_members, VideoPolicy(num_frames=2))
    assert from_frames.decoder == "frames" and np.array_equal(from_frames.frames, decoded.frames)
    assert (from_frames.indices, from_frames.timestamps, from_frames.sample_fps) == (
        decoded.indices,
        decoded.timestamps,
        decoded.sample_fps,
    )
    # ... but its pixel budget applies, as to a decoded video.
    small = capture_clip(sample, members, VideoPolicy(max_pixels=4 * 32 * 24))
    assert small.frames.shape == (4, 24, 32, 3)


def test_a_missing_or_corrupt_frame_is_a_counted_skip(media) -> None:
    sample, members, _ = convert(media, "carphone.mp4", FrameExtraction(num_frames=3))
    adapter = SimpleNamespace(video="frames", family="llava")
    part = sample.media[0]
    for broken, reason in [
        ({k: v for k, v in members.items() if k != part.frame_members[1]}, "missing_member"),
        ({**members, part.frame_members[2]: b"\0" * 100}, "bad_video"),
        ({**members, part.frame_members[0]: members[part.frame_members[0]][:300]}, "bad_video"),
    ]:
        with pytest.raises(RenderError) as e:
            render_sample(adapter, sample, broken)  # type: ignore[arg-type]
        assert e.value.reason == reason, e.value
    other = Sample.from_json(
        json.dumps(
            {
                **json.loads(sample.to_json()),
                "turns": [
                    Turn(
                        role="user",
                        parts=[VideoPart(**{**vars(part), "frame_indices": [0]}), TextPart(text="q")],
                    ),
                    Turn(role="assistant", parts=[TextPart(text="a")]),
                ],
            },
            default=vars,
        )
    )
    with pytest.raises(RenderError, match="3 frame members but 1 frame indices"):
        render_sample(adapter, other, members)  # type: ignore[arg-type]
