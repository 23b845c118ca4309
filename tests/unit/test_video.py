"""Video frames for training (data_tools/video.py): which frames each policy samples, decord and
PyAV decoding the same frames from bytes in memory, odd videos decoding, broken ones refused."""

from __future__ import annotations

import numpy as np
import pytest

from data_tools.video import VideoPolicy, _decord, _pyav, decode_video, fit_budget, frame_indices


def test_fixed_count_is_uniform_and_a_samples_num_frames_wins() -> None:
    policy = VideoPolicy(num_frames=4, max_frames=16)
    assert frame_indices(100, 25.0, policy) == [0, 33, 66, 99]
    assert frame_indices(100, 25.0, policy, num_frames=2) == [0, 99]
    assert frame_indices(3, 25.0, policy) == [0, 1, 2]  # fewer frames than asked: all of them
    assert frame_indices(100, 25.0, policy, num_frames=50) == frame_indices(
        100, 25.0, VideoPolicy(num_frames=16)
    )
    assert frame_indices(0, 25.0, policy) == []


def test_fps_policy_within_min_and_max() -> None:
    policy = VideoPolicy(fps=2.0, min_frames=4, max_frames=10)
    assert len(frame_indices(250, 25.0, policy)) == 10  # 10 s -> 20 frames, capped at 10
    assert len(frame_indices(75, 25.0, policy)) == 6  # 3 s -> 6
    assert len(frame_indices(25, 25.0, policy)) == 4  # 1 s -> 2, raised to 4
    with pytest.raises(ValueError, match="data.video.fps"):
        VideoPolicy(fps=0)


def test_pixel_budget_scales_every_frame_down() -> None:
    frames = np.zeros((8, 240, 320, 3), np.uint8)
    out = fit_budget(frames, 8 * 120 * 160)
    assert out.shape == (8, 120, 160, 3)
    assert fit_budget(frames, 0) is frames


@pytest.mark.parametrize(
    "name, frames",
    [("bikes.mp4", 8), ("carphone.mp4", 8), ("short.mp4", 3), ("one_frame.mp4", 1), ("vfr.mp4", 8)],
)
def test_decord_and_pyav_decode_the_same_frames(media, name: str, frames: int) -> None:
    data = media[name].read_bytes()
    a, b = _decord(data, VideoPolicy(), None), _pyav(data, VideoPolicy(), None)
    assert a.indices == b.indices and len(a.indices) == frames and a.total_frames == b.total_frames
    assert np.array_equal(a.frames, b.frames)
    clip = decode_video(data, VideoPolicy())
    assert clip.decoder == "decord" and clip.frames.dtype == np.uint8 and clip.frames.shape[0] == frames
    assert clip.timestamps[0] == 0 and clip.timestamps == sorted(clip.timestamps)


def test_pyav_takes_what_decord_cannot_open(media) -> None:
    # A JPEG in an mp4's clothing: decord refuses it, PyAV reads it as a one-frame MJPEG stream.
    clip = decode_video(media["jpeg_named.mp4"].read_bytes(), VideoPolicy())
    assert clip.decoder == "pyav" and clip.frames.shape[0] == 1


@pytest.mark.parametrize("name", ["truncated.mp4", "garbage_frames.mp4"])
def test_broken_videos_raise_with_both_decoders_named(media, name: str) -> None:
    with pytest.raises(ValueError, match="decord: .*pyav: "):
        decode_video(media[name].read_bytes(), VideoPolicy())


def test_pyav_refuses_a_stream_shorter_than_declared(media) -> None:
    with pytest.raises(ValueError, match="truncated"):
        _pyav(media["truncated_faststart.mp4"].read_bytes(), VideoPolicy(), None)
