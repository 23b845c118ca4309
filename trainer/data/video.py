"""Video decoding for training: frames sampled from the bytes inside a shard (decord, PyAV fallback).

The implementation lives in data_tools/video.py, shared with the converter's frame extraction
(`shard.py --video-frames`), so frames pre-extracted at conversion are exactly the frames this
path would decode. `data.video` is a VideoPolicy; a video the decoders refuse raises ValueError,
which render counts as a bad_video skip.

    clip = decode_video(data, VideoPolicy(num_frames=8))
    clip.frames        # uint8 [T, H, W, 3]
    clip.timestamps    # seconds of each sampled frame
"""

from data_tools.video import Clip, VideoPolicy, _decord, _pyav, decode_video, fit_budget, frame_indices

__all__ = ["Clip", "VideoPolicy", "_decord", "_pyav", "decode_video", "fit_budget", "frame_indices"]
