"""`shard.py --video-frames N` (and `--video-fps F`) on real and odd videos: each video is decoded
once at conversion and the sample stores its sampled frames as images instead of the video; the
frame indices are the ones training would decode (a sample's num_frames first), the settings are
part of the fingerprint, a frame damaged inside a shard is a counted bad_video skip, and the
frames shards train a tiny llava to the same losses as decoding the videos at training time."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools.sample import Sample, VideoPart
from data_tools.video import VideoPolicy, decode_video, frame_indices
from tests.support import REPO
from tests.support.runs import dry_run
from tests.support.shards import dump, run, shard

ASK = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Something moves."}]


def write_rotated(path: Path, source: Path) -> Path:
    """`source` with a 90-degree display matrix in its track header (phone videos look like this)."""
    data = bytearray(source.read_bytes())
    at = data.find(b"tkhd") + 4
    assert data[at] == 0  # version 0: the matrix is at +40
    data[at + 40 : at + 76] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    path.write_bytes(bytes(data))
    return path


def write_with_audio(path: Path, frames: int = 15, fps: int = 10) -> Path:
    """An mp4 with a video and an AAC audio track, interleaved."""
    import av

    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = 96, 64, "yuv420p"
        audio = out.add_stream("aac", rate=16000)
        audio.layout = "mono"
        for i in range(frames):
            img = np.zeros((64, 96, 3), np.uint8)
            img[:, : 6 * (i + 1) % 96] = (200, 40, 90)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in video.encode(frame):
                out.mux(packet)
            sound = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.float32), format="fltp", layout="mono")
            sound.sample_rate, sound.pts = 16000, i * 1600
            for packet in audio.encode(sound):
                out.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode(None):
                out.mux(packet)
    return path


# id -> (video file, the sample's num_frames)
VIDEOS = {
    "bikes": ("bikes.mp4", 3),
    "carphone": ("carphone.mp4", None),
    "carphone-6": ("carphone.mp4", 6),
    "short": ("short.mp4", 8),
    "one-frame": ("one_frame.mp4", None),
    "vfr": ("vfr.mp4", 5),
    "rotated": ("rotated.mp4", None),
    "with-audio": ("with_audio.mp4", None),
}
REJECTED = {
    "audio-only": ("audio_only.m4a", "no_video_stream"),
    "truncated": ("truncated.mp4", "undecodable_video"),
    "truncated-faststart": ("truncated_faststart.mp4", "truncated_video"),
}
# trained on: every video, each with up to 4 frames of 576 tokens (tiny llava takes frames as images)
TRAIN = ["carphone", "vfr", "short", "one-frame", "rotated", "with-audio"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, media: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("videos")
    mdir = root / "media"
    mdir.mkdir()
    for name in [
        "bikes.mp4",
        "carphone.mp4",
        "short.mp4",
        "one_frame.mp4",
        "vfr.mp4",
        "audio_only.m4a",
        "truncated.mp4",
        "truncated_faststart.mp4",
        "flower.jpg",
    ]:
        shutil.copy(media[name], mdir / name)
    write_rotated(mdir / "rotated.mp4", media["short.mp4"])
    write_with_audio(mdir / "with_audio.mp4")
    records = []
    for id_, (name, n) in VIDEOS.items():
        records.append(
            {"id": id_, "video": f"media/{name}", "conversations": ASK, **({"num_frames": n} if n else {})}
        )
    for id_, (name, _) in REJECTED.items():
        records.append({"id": id_, "video": f"media/{name}", "conversations": ASK})
    records.append(
        {
            "id": "image-and-video",
            "image": "media/flower.jpg",
            "video": "media/short.mp4",
            "conversations": [
                {"from": "human", "value": "<image>\n<video>\nSame place?"},
                {"from": "gpt", "value": "No."},
            ],
        }
    )
    dump(root / "videos.json", records)
    dump(root / "train.json", [r for r in records if r["id"] in TRAIN])
    (root / "data.txt").write_text("videos.json 0.012\n")
    (root / "train.txt").write_text("train.json 0.006\n")
    return root


def samples(out: Path) -> dict[str, tuple[Sample, dict[str, bytes]]]:
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["path"]) for src in manifest["sources"] for s in src["shards"]]
    got = {}
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        sample = Sample.from_json(raw["json"])
        got[sample.id] = (sample, {k: v for k, v in raw.items() if not k.startswith("__") and k != "json"})
    return got


@pytest.fixture(scope="module")
def converted(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("jpeg") / "shards"
    start = time.perf_counter()
    proc = shard(dataset / "data.txt", out, "--video-frames", "4", "--workers", "2")
    print(f"converted with --video-frames 4 in {time.perf_counter() - start:.1f} s")
    return out, proc.stdout


def test_videos_become_their_sampled_frames(converted: tuple[Path, str], dataset: Path) -> None:
    out, stdout = converted
    manifest = json.loads((out / "manifest.json").read_text())
    [source] = manifest["sources"]
    got = samples(out)
    assert sorted(got) == sorted([*VIDEOS, "image-and-video"])
    expected_frames = 0
    policy = VideoPolicy(num_frames=4)  # = data.video at training time
    for id_, (sample, members) in got.items():
        name, num_frames = VIDEOS.get(id_, ("short.mp4", None))
        part = next(p for p in sample.media if isinstance(p, VideoPart))
        data = (dataset / "media" / name).read_bytes()
        clip = decode_video(data, policy, num_frames)  # what training would decode
        assert part.num_frames == num_frames
        assert (
            part.frame_indices
            == clip.indices
            == frame_indices(clip.total_frames, clip.fps, policy, num_frames)
        )
        assert (part.source_fps, part.source_frames) == (clip.fps, clip.total_frames), id_
        assert part.frame_timestamps == [round(t, 6) for t in clip.timestamps]
        assert len(part.frame_indices) == min(num_frames or 4, part.frames)
        assert part.frame_members == [f"vid0.frame{j}.jpg" for j in range(len(clip.indices))]
        assert (part.bytes, part.format) == (len(data), "mp4")  # the original video's metadata, kept
        assert not [m for m in members if m.endswith((".mp4", ".m4a"))]  # no video in the shard
        for m in part.frame_members:
            img = Image.open(io.BytesIO(members[m]))
            assert img.format == "JPEG" and img.size == (part.width, part.height), (id_, img.size)
            img.load()
        expected_frames += len(part.frame_members)
    assert sorted(got["image-and-video"][1]) == [
        "img0.jpg",
        "vid0.frame0.jpg",
        "vid0.frame1.jpg",
        "vid0.frame2.jpg",
    ]
    assert [
        len(got[i][0].media[0].frame_members)
        for i in ("bikes", "carphone", "carphone-6", "short", "one-frame")
    ] == [3, 4, 6, 3, 1]  # a sample's num_frames honoured
    assert source["frames"] == expected_frames and source["videos"] == len(got) and source["images"] == 1
    assert manifest["totals"]["frames"] == expected_frames
    assert manifest["options"]["video_frames"] == {
        "num_frames": 4,
        "fps": None,
        "min_frames": 2,
        "max_frames": 32,
        "format": "jpeg",
        "quality": 95,
    }
    assert (
        f"videos stored as their sampled frames: {expected_frames} frames of {len(got)} videos, 4 per video"
        in stdout
    )
    rejected = {r["id"]: r for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    assert {k: r["code"] for k, r in rejected.items()} == {k: code for k, (_, code) in REJECTED.items()}
    assert "audio only" in rejected["audio-only"]["reason"]


def test_png_frames_hold_the_decoded_pixels_exactly(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "png"
    shard(dataset / "data.txt", out, "--video-frames", "4", "--video-frame-format", "png", "--workers", "1")
    for id_, (sample, members) in samples(out).items():
        name, num_frames = VIDEOS.get(id_, ("short.mp4", None))
        part = next(p for p in sample.media if isinstance(p, VideoPart))
        clip = decode_video((dataset / "media" / name).read_bytes(), VideoPolicy(num_frames=4), num_frames)
        stored = np.stack([np.asarray(Image.open(io.BytesIO(members[m]))) for m in part.frame_members])
        assert part.frame_members[0].endswith(".png") and np.array_equal(stored, clip.frames), id_


def test_fps_policy(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "fps"
    shard(
        dataset / "data.txt",
        out,
        "--video-fps",
        "2",
        "--video-min-frames",
        "3",
        "--video-max-frames",
        "7",
        "--workers",
        "1",
    )
    policy = VideoPolicy(fps=2.0, min_frames=3, max_frames=7)
    got = samples(out)
    for id_, (sample, _) in got.items():
        part = sample.media[-1]
        num_frames = VIDEOS.get(id_, ("short.mp4", None))[1]
        assert part.frame_indices == frame_indices(part.source_frames, part.source_fps, policy, num_frames), (
            id_
        )
    # bikes: 10 s -> 20 frames but asks for 3; carphone: 4 s -> 8, capped at 7; carphone-6 asks for 6
    assert [
        len(got[i][0].media[0].frame_indices) for i in ("bikes", "carphone", "carphone-6", "one-frame")
    ] == [3, 7, 6, 1]
    assert json.loads((out / "manifest.json").read_text())["options"]["video_frames"]["fps"] == 2.0


def test_rerun_reuses_and_other_settings_convert_again(
    converted: tuple[Path, str], dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shards"
    first = shard(dataset / "data.txt", out, "--video-frames", "4", "--workers", "1")
    assert "(reused)" not in first.stdout

    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.tar"))}

    assert tree(out) == tree(converted[0])  # 1 worker and 2 give the same bytes
    assert "(reused)" in shard(dataset / "data.txt", out, "--video-frames", "4").stdout
    for settings, frames_of_carphone, member in [
        (["--video-frames", "2"], 2, "vid0.frame0.jpg"),
        (["--video-frames", "2", "--video-frame-format", "png"], 2, "vid0.frame0.png"),
        (["--video-fps", "1"], 4, "vid0.frame0.jpg"),
        ([], None, "vid0.mp4"),
    ]:
        proc = shard(dataset / "data.txt", out, *settings)
        assert "(reused)" not in proc.stdout, settings
        part = samples(out)["carphone"][0].media[0]
        assert (
            part.member == member
            and (len(part.frame_members) if part.frame_members else None) == frames_of_carphone
        )
        assert ("videos stored as their sampled frames" in proc.stdout) == bool(settings)
    assert json.loads((out / "manifest.json").read_text())["options"]["video_frames"] is None
    assert run("data_tools/inspect.py", out, "--verify").returncode == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--video-frames", "0"], "--video-frames must be >= 1"),
        (["--video-fps", "0"], "--video-fps must be > 0"),
        (["--video-max-frames", "4"], "need --video-frames N or --video-fps F"),
        (
            ["--video-fps", "1", "--video-min-frames", "9", "--video-max-frames", "4"],
            "--video-min-frames <= --video-max-frames",
        ),
        (["--video-frames", "4", "--video-fps", "1"], "not allowed with argument"),
        (["--video-frames", "4", "--video-frame-format", "gif"], "invalid choice"),
    ],
)
def test_bad_settings_stop_before_writing(
    dataset: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    proc = shard(dataset / "data.txt", tmp_path / "out", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_frame_damaged_in_the_shard_is_a_counted_skip(
    tiny, converted: tuple[Path, str], tmp_path: Path
) -> None:
    """Frames shards render without a video decoder (every sample, nothing skipped); a frame whose
    bytes go bad inside the shard is a bad_video skip in the dry run, not a crash."""
    shards = tmp_path / "shards"
    shutil.copytree(converted[0], shards)
    out = dry_run(tiny, shards, "data.workers=0", "data.packing.max_tokens=4096")
    assert out["skipped"] == {} and out["samples"] == 12  # 9 samples, up-sampled to 12
    [tar_path] = shards.rglob("*.tar")
    with tarfile.open(tar_path) as tar:
        frame = next(m for m in tar.getmembers() if m.name.endswith(".vid0.frame1.jpg"))
    with open(tar_path, "r+b") as f:  # same size: the shard still reads as a tar
        f.seek(frame.offset_data)
        f.write(b"\0" * frame.size)
    out = dry_run(
        tiny, shards, "data.workers=0", "data.packing.max_tokens=4096", "data.max_skip_fraction=0.5"
    )
    damaged = 12 - out["samples"]
    assert out["skipped"] == {"bad_video": damaged} and damaged >= 1


def train_losses(tiny, shards: Path, run_dir: Path) -> tuple[list[float], float]:
    cmd = [
        sys.executable,
        "-m",
        "trainer.train",
        "--config",
        "configs/tiny-llava.yaml",
        f"model.path={tiny('llava')}",
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        "train.steps=4",
        "train.dtype=fp32",
        "checkpoint.every=0",
        "run.export=false",
        "data.video.num_frames=4",
        "optim.warmup_steps=0",
        "optim.schedule=constant",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")], seconds


def test_frames_shards_train_to_the_same_loss_as_decoding_videos(tiny, dataset: Path, tmp_path: Path) -> None:
    """The issue's bar: the same frame indices, pre-extracted at conversion or decoded at training
    time, give the same losses (tiny llava, fp32): equal with PNG frames, close with JPEG."""
    sets = {
        "video": [],
        "png": ["--video-frames", "4", "--video-frame-format", "png"],
        "jpeg": ["--video-frames", "4"],
    }
    losses = {}
    for name, args in sets.items():
        shard(dataset / "train.txt", tmp_path / name, *args, "--workers", "1")
        with tarfile.open(next((tmp_path / name).rglob("*.tar"))) as tar:
            videos = [m.name for m in tar.getmembers() if m.name.endswith(".mp4")]
        assert len(videos) == (len(TRAIN) if name == "video" else 0)  # frames shards: no video to decode
        losses[name], seconds = train_losses(tiny, tmp_path / name, tmp_path / f"run-{name}")
        print(f"{name}: losses {losses[name]} in {seconds:.1f} s")
    assert len(losses["video"]) == 4 and losses["video"][-1] < losses["video"][0]
    assert losses["png"] == losses["video"]  # bitwise, every step
    assert losses["jpeg"] != losses["video"]
    assert max(abs(a - b) for a, b in zip(losses["jpeg"], losses["video"])) < 0.05 * losses["video"][0]
