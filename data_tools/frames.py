"""Videos stored as their sampled frames: decoded once at conversion, so training runs no decoder.

`shard.py --video-frames N` (or `--video-fps F` with `--video-min-frames/--video-max-frames`)
samples each video with the very code training uses (data_tools/video.py: `frame_indices`,
`decode_video`, decord first, PyAV as the fallback), a sample's own `num_frames` winning over N
as it does at training time. The frames are stored as image members of the sample (JPEG, or PNG:
the decoded pixels exactly) in place of the video, and the sample's VideoPart records them:

    {"type": "video", "member": "vid0.frame0.jpg",            # the first frame member
     "width": 176, "height": 144, "frames": 120, "fps": 29.97003, "duration": 4.004,
     "format": "mp4", "bytes": 183584,                        # the original video's, kept
     "frame_members": ["vid0.frame0.jpg", ...],               # one image per sampled frame
     "frame_indices": [0, 40, 79, 119],                       # which frames of the video
     "frame_timestamps": [0.0, 1.334667, 2.635967, 3.970633],  # seconds: index / source_fps
     "source_fps": 29.97002997002997, "source_frames": 120}   # as the decoder read the video

At training, `stored_clip` turns such a part back into the `Clip` that decoding the video would
have given (same frames, indices, fps), and everything after that is the same as for a video.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from data_tools.sample import Rejected, VideoPart
from data_tools.video import Clip, VideoPolicy, decode_video, fit_budget

FORMATS = {"jpeg": "jpg", "jpg": "jpg", "png": "png"}  # --video-frame-format -> member extension


@dataclass(frozen=True, kw_only=True)
class FrameExtraction:
    """How the converter samples and stores frames; part of every source's fingerprint."""

    num_frames: int | None = None  # frames spread uniformly over each video (a sample's num_frames wins)
    fps: float | None = None  # instead: frames per second of video ...
    min_frames: int = VideoPolicy.min_frames  # ... at least this many
    max_frames: int = VideoPolicy.max_frames  # at most this many per video, a sample's num_frames included
    format: str = "jpeg"  # "jpeg" or "png"
    quality: int = 95  # JPEG quality

    def __post_init__(self) -> None:
        if (self.num_frames is None) == (self.fps is None):
            raise ValueError("frame extraction needs exactly one of --video-frames N and --video-fps F")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"--video-frames must be >= 1, got {self.num_frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"--video-fps must be > 0, got {self.fps}")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(
                f"need 1 <= --video-min-frames <= --video-max-frames, got "
                f"{self.min_frames} and {self.max_frames}"
            )
        if self.format not in ("jpeg", "png"):
            raise ValueError(f"--video-frame-format must be jpeg or png, got {self.format!r}")

    @property
    def ext(self) -> str:
        return FORMATS[self.format]

    def policy(self) -> VideoPolicy:
        """The training-time policy that samples the same frames (`data.video` set alike)."""
        return VideoPolicy(
            num_frames=self.num_frames or VideoPolicy.num_frames,
            fps=self.fps,
            min_frames=self.min_frames,
            max_frames=self.max_frames,
        )

    def describe(self) -> str:
        if self.num_frames is not None:
            how = f"{self.num_frames} per video"
        else:
            how = f"{self.fps:g} per second, {self.min_frames} to {self.max_frames} per video"
        kind = f"JPEG q{self.quality}" if self.format == "jpeg" else "PNG"
        return f"{how} (a sample's num_frames first, at most {self.max_frames}), as {kind} images"


def extract_frames(
    data: bytes, origin: str, how: FrameExtraction, num_frames: int | None = None
) -> tuple[Clip, list[bytes]]:
    """Sample and decode the frames training would, and encode each as an image; Rejected when
    no decoder can (the converter already proved the first frame decodes)."""
    try:
        clip = decode_video(data, how.policy(), num_frames)
    except ValueError as e:
        raise Rejected(
            "undecodable_video",
            f"video {origin!r}: its sampled frames do not decode ({e}); re-encode or replace it",
        ) from None
    return clip, [encode_frame(frame, how) for frame in clip.frames]


def encode_frame(frame: Any, how: FrameExtraction) -> bytes:
    """One uint8 [H, W, 3] frame as JPEG or PNG bytes (deterministic: same pixels, same bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    if how.format == "png":
        Image.fromarray(frame).save(buf, format="PNG")
    else:
        Image.fromarray(frame).save(buf, format="JPEG", quality=how.quality)
    return buf.getvalue()


def frames_record(clip: Clip, members: list[str]) -> dict[str, Any]:
    """The VideoPart fields that say the sample holds these frames instead of the video."""
    return {
        "frame_members": members,
        "frame_indices": list(clip.indices),
        "frame_timestamps": [round(t, 6) for t in clip.timestamps],
        "source_fps": float(clip.fps),
        "source_frames": int(clip.total_frames),
    }


def stored_clip(part: VideoPart, members: dict[str, bytes], max_pixels: int = 0) -> Clip:
    """The Clip of a part whose frames were extracted at conversion: its stored images decoded,
    indices and fps from its record; only the pixel budget (`data.video.max_pixels`) of the
    training-time policy applies. ValueError when a frame does not decode."""
    import numpy as np
    from PIL import Image

    assert part.frame_members and part.frame_indices is not None
    if len(part.frame_members) != len(part.frame_indices):
        raise ValueError(
            f"{len(part.frame_members)} frame members but {len(part.frame_indices)} frame indices"
        )
    frames = []
    for name in part.frame_members:
        try:
            with Image.open(io.BytesIO(members[name])) as img:
                frames.append(np.asarray(img.convert("RGB")))
        except KeyError:
            raise ValueError(f"frame member {name} is missing") from None
        except Exception as e:  # noqa: BLE001 - Pillow raises many types on corrupt data
            raise ValueError(f"frame {name} does not decode ({e!r})") from None
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"the frames differ in size: {sorted({f.shape[:2] for f in frames})}")
    clip = Clip(
        frames=np.stack(frames),
        indices=list(part.frame_indices),
        fps=float(part.source_fps or 0.0),
        total_frames=int(part.source_frames or 0),
        decoder="frames",
    )
    clip.frames = fit_budget(clip.frames, max_pixels)
    return clip
