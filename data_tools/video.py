"""Video frame sampling and decoding from bytes in memory, no temporary files: the one
implementation that training (trainer/data/render.py) and the converter's frame
extraction (`shard.py --video-frames`, data_tools/frames.py) share, so both pick the same frames.

decord reads the container from memory and seeks to the sampled frames; PyAV is the fallback for
containers decord cannot open (and the only decoder off x86-64). A video that neither can decode
raises ValueError: training counts it as a bad_video skip, the converter rejects the sample.
Only numpy is imported here; PIL, decord and PyAV when first used.

Which frames (`data.video`, a sample's own `num_frames` winning over the fixed count):

- fixed count: `num_frames` frames spread uniformly over the video (np.linspace over the frame
  indices, as lmms-finetune samples them), all frames when the video has fewer;
- frames per second (`fps` set): duration x fps frames, within [`min_frames`, `max_frames`];
- a pixel budget (`max_pixels`): frames x height x width above it scales every frame down to fit,
  so one long or large video cannot take more than its share of a pack.

    clip = decode_video(data, VideoPolicy(num_frames=8))
    clip.frames        # uint8 [T, H, W, 3]
    clip.timestamps    # seconds of each sampled frame
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class VideoPolicy:
    num_frames: int = 8  # frames sampled uniformly per video (a sample's num_frames wins)
    fps: float | None = None  # instead: this many frames per second of video ...
    min_frames: int = 2  # ... but at least this many
    max_frames: int = 32  # ... and at most this many (also caps num_frames)
    max_pixels: int = 0  # frames x height x width per video above this: frames scaled down

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.min_frames < 1 or self.max_frames < self.min_frames:
            raise ValueError(
                f"data.video: need num_frames >= 1 and 1 <= min_frames <= max_frames, got "
                f"{self.num_frames}, {self.min_frames}, {self.max_frames}"
            )
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"data.video.fps must be > 0, got {self.fps}")
        if self.max_pixels < 0:
            raise ValueError(f"data.video.max_pixels must be >= 0, got {self.max_pixels}")


@dataclass
class Clip:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    indices: list[int]  # which frames of the video
    fps: float  # the video's average frame rate
    total_frames: int
    decoder: str  # "decord" or "pyav"

    @property
    def timestamps(self) -> list[float]:
        return [i / self.fps for i in self.indices] if self.fps > 0 else [0.0] * len(self.indices)

    @property
    def sample_fps(self) -> float:
        """Sampled frames per second of video (what Qwen-VL's temporal rope spacing needs)."""
        duration = self.total_frames / self.fps if self.fps > 0 else 0.0
        return len(self.indices) / duration if duration > 0 else 1.0


def frame_indices(total: int, fps: float, policy: VideoPolicy, num_frames: int | None = None) -> list[int]:
    """The frames to decode out of `total` frames at `fps`."""
    if total <= 0:
        return []
    if num_frames is not None:
        n = num_frames
    elif policy.fps is not None:
        duration = total / fps if fps > 0 else 0.0
        n = min(max(round(duration * policy.fps), policy.min_frames), policy.max_frames)
    else:
        n = policy.num_frames
    n = max(1, min(n, policy.max_frames, total))
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def fit_budget(frames: np.ndarray, max_pixels: int) -> np.ndarray:
    """Scale every frame down (same size for all) so frames x height x width <= max_pixels."""
    t, h, w = frames.shape[:3]
    if not max_pixels or t * h * w <= max_pixels:
        return frames
    from PIL import Image

    scale = math.sqrt(max_pixels / (t * h * w))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in frames])


def _decord(data: bytes, policy: VideoPolicy, num_frames: int | None) -> Clip:
    import decord

    reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    total, fps = len(reader), float(reader.get_avg_fps())
    indices = frame_indices(total, fps, policy, num_frames)
    if not indices:
        raise ValueError("the video has no frames")
    frames = reader.get_batch(indices).asnumpy()
    return Clip(frames=frames, indices=indices, fps=fps, total_frames=total, decoder="decord")


def _pyav(data: bytes, policy: VideoPolicy, num_frames: int | None) -> Clip:
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        indices = frame_indices(total, fps, policy, num_frames)
        if not indices:
            raise ValueError("the video has no frames")
        container.seek(0)
        wanted, frames = set(indices), {}
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if i >= indices[-1]:
                break
    missing = [i for i in indices if i not in frames]
    if missing:
        raise ValueError(f"truncated: frame {missing[0]} of the {total} the stream declares does not decode")
    return Clip(
        frames=np.stack([frames[i] for i in indices]),
        indices=indices,
        fps=fps,
        total_frames=total,
        decoder="pyav",
    )


def decode_video(data: bytes, policy: VideoPolicy, num_frames: int | None = None) -> Clip:
    """Sample and decode frames of a video held in memory; ValueError when no decoder can."""
    errors = []
    for decoder in (_decord, _pyav):
        try:
            clip = decoder(data, policy, num_frames)
        except Exception as e:  # noqa: BLE001 - decord raises its own DECORDError, PyAV many kinds
            errors.append(f"{decoder.__name__.strip('_')}: {e!r}"[:300])
            continue
        clip.frames = fit_budget(clip.frames, policy.max_pixels)
        return clip
    raise ValueError("; ".join(errors))
