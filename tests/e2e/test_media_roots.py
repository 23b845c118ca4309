"""`shard.py --media-root` given several times, on a miniature of lmms-finetune's `example_data/`:
JSON files beside an `images/` and a `videos/` folder (its `--image_folder` / `--video_folder`),
media paths relative to those folders, one sample naming an image and a video. A relative path
resolves against the first root that holds it; a missing one is rejected naming every root."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.support.shards import dump, read_samples, shard

EGO4D = "ego4d/0219ad48-8f54-4f61-b22f-4d1e8173e584.mp4"
# lmms-finetune's file names -> the real media of tests/media.py they are copies of
IMAGES = {
    "bm.jpg": "flower.jpg",
    "curry.jpg": "PHOTO.JPG",
    "soccer1.jpg": "progressive.jpg",
    "soccer2.jpg": "rotated.jpg",
    "post1.png": "gray.png",
    "post2.png": "rgba.png",
    "celeba/000001.jpg": "cmyk.jpg",
}
VIDEOS = {"bm_teaser.mp4": "carphone.mp4", "curry_vs_thunder.mp4": "short.mp4", EGO4D: "vfr.mp4"}


def qa(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# The shapes of lmms-finetune's example JSON files, shortened.
SOURCES = {
    "single_image_has_text_only.json": [
        {
            "system_prompt": "Answer the following questions about the image.",
            "image": "bm.jpg",
            "conversations": qa("<image>Who are the people in this image?", "A band.")
            + qa("When will their album be released?", "In April."),
        },
        {"image": "curry.jpg", "conversations": qa("<image>Describe this image.", "A basketball player.")},
        {"conversations": qa("What is the capital of France?", "Paris.")},
    ],
    "multi_images.json": [
        {
            "system_prompt": "Answer the following questions by considering all images.",
            "image": ["soccer1.jpg", "soccer2.jpg"],
            "conversations": qa("<image><image>Which image has more people?", "The second."),
        },
        {"image": ["post1.png", "post2.png"], "conversations": qa("Write a post.<image><image>", "Milan.")},
    ],
    "video.json": [
        {
            "system_prompt": "Answer the following questions about the video.",
            "video": "bm_teaser.mp4",
            "image": "bm.jpg",
            "conversations": qa("<video>What is this video about?", "A teaser.")
            + qa("<image>What does this image show?", "The band."),
        },
        {"video": "curry_vs_thunder.mp4", "conversations": qa("<video>Describe this video.", "A last shot.")},
    ],
    "celeba_image_train.json": [
        {"image": "celeba/000001.jpg", "conversations": qa("<image>Describe the person.", "Smiling.")}
    ],
    "ego4d_video_train.json": [
        {"video": EGO4D, "conversations": qa("<video>Please describe the video in detail.", "Office work.")}
    ],
}
WITH_VIDEO = {("video.json", 0), ("video.json", 1), ("ego4d_video_train.json", 0)}


@pytest.fixture(scope="module")
def example_data(tmp_path_factory: pytest.TempPathFactory, media: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("lmms") / "example_data"
    for folder, files in (("images", IMAGES), ("videos", VIDEOS)):
        for name, real in files.items():
            (root / folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(media[real], root / folder / name)
    for name, records in SOURCES.items():
        dump(root / name, records)
    (root / "data.txt").write_text("".join(f"{name} {len(recs) / 1000}\n" for name, recs in SOURCES.items()))
    return root


def media_by_sample(out: Path) -> dict[tuple[str, int], list[tuple[str, str, bytes]]]:
    """(source file, input index) -> sorted (kind, path as written, bytes stored) of its media."""
    manifest = json.loads((out / "manifest.json").read_text())
    got = {}
    for source in manifest["sources"]:
        for members in read_samples(out, source) if source["shards"] else []:
            sample = json.loads(members["json"])
            parts = [p for turn in sample["turns"] for p in turn["parts"] if p["type"] != "text"]
            got[source["path"], sample["index"]] = sorted(
                (p["type"], p["origin"], members[p["member"]]) for p in parts
            )
    return got


def expected_media(root: Path, keep: set[tuple[str, int]] | None = None) -> dict:
    """What media_by_sample must find: each record's files read from images/ or videos/."""
    want = {}
    for name, records in SOURCES.items():
        for i, record in enumerate(records):
            if keep is None or (name, i) in keep:
                images, video = record.get("image", []), record.get("video")
                items = [("image", "images", p) for p in ([images] if isinstance(images, str) else images)]
                items += [("video", "videos", video)] if video else []
                want[name, i] = sorted(
                    (kind, path, (root / folder / path).read_bytes()) for kind, folder, path in items
                )
    return want


def rejections(out: Path) -> dict[tuple[str, int], dict]:
    lines = (out / "rejected.jsonl").read_text().splitlines()
    return {(r["source"], r["index"]): r for r in map(json.loads, lines)}


def test_example_data_converts_with_an_image_and_a_video_root(example_data: Path, tmp_path: Path) -> None:
    images, videos = example_data / "images", example_data / "videos"
    out = tmp_path / "shards"
    shard(example_data / "data.txt", out, "--media-root", images, "--media-root", videos)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["totals"]["samples"], manifest["totals"]["rejected"]) == (9, 0)
    assert (manifest["totals"]["images"], manifest["totals"]["videos"]) == (8, 3)
    assert rejections(out) == {}
    assert manifest["options"]["media_root"] == [str(images.resolve()), str(videos.resolve())]
    assert media_by_sample(out) == expected_media(example_data)


def test_with_one_root_the_other_roots_media_are_rejected(example_data: Path, tmp_path: Path) -> None:
    images = example_data / "images"
    out = tmp_path / "shards"
    shard(example_data / "data.txt", out, "--media-root", images)
    rejected = rejections(out)
    assert set(rejected) == WITH_VIDEO
    for (name, i), line in rejected.items():
        video = SOURCES[name][i]["video"]
        assert line["code"] == "missing_media"
        assert line["reason"].startswith(f"video {video!r} not found at {images.resolve() / video};")
        assert "--media-root" in line["reason"]
    got = media_by_sample(out)
    assert len(got) == 9 - len(WITH_VIDEO) and got == expected_media(example_data, keep=set(got))
    assert json.loads((out / "manifest.json").read_text())["options"]["media_root"] == [str(images.resolve())]


def test_the_first_root_holding_a_path_wins(tmp_path: Path, media: dict[str, Path]) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for root, both in ((first, "flower.jpg"), (second, "gray.png")):
        root.mkdir()
        shutil.copy(media[both], root / "both.jpg")
    shutil.copy(media["one.png"], second / "only_second.png")
    dump(
        tmp_path / "a.json",
        [
            {"id": name, "image": name, "conversations": qa("<image>What?", "This.")}
            for name in ("both.jpg", "only_second.png", "nowhere.jpg")
        ],
    )
    (tmp_path / "data.txt").write_text("a.json 0.003\n")

    def stored(out: Path) -> dict[str, bytes]:
        return {origin: data for parts in media_by_sample(out).values() for _, origin, data in parts}

    out = tmp_path / "shards"
    shard(tmp_path / "data.txt", out, "--media-root", first, "--media-root", second)
    assert stored(out) == {
        "both.jpg": media["flower.jpg"].read_bytes(),
        "only_second.png": media["one.png"].read_bytes(),
    }
    [missing] = rejections(out).values()
    assert (missing["id"], missing["index"], missing["code"]) == ("nowhere.jpg", 2, "missing_media")
    searched = f"{first.resolve()}, {second.resolve()}"
    assert (
        f"image 'nowhere.jpg' not found in any media root (searched in order: {searched});"
        in missing["reason"]
    )

    swapped = tmp_path / "swapped"
    shard(tmp_path / "data.txt", swapped, "--media-root", second, "--media-root", first)
    assert stored(swapped)["both.jpg"] == media["gray.png"].read_bytes()

    # A file that appears in an earlier root changes what a path resolves to: not reused.
    shutil.copy(media["rgba.png"], first / "only_second.png")
    rerun = shard(tmp_path / "data.txt", out, "--media-root", first, "--media-root", second)
    assert "(reused)" not in rerun.stdout
    assert stored(out)["only_second.png"] == media["rgba.png"].read_bytes()


FAKE_SBATCH = """#!{python}
# Stands in for sbatch: runs the --wrap command at once, each array index in turn.
import os, subprocess, sys
args = sys.argv[1:]
array = next((a.split("=")[1] for a in args if a.startswith("--array=")), None)
for task in range(int(array.split("-")[1]) + 1) if array else [None]:
    env = {{**os.environ, **({{"SLURM_ARRAY_TASK_ID": str(task)}} if array else {{}})}}
    subprocess.run(["bash", "-c", args[args.index("--wrap") + 1]], env=env, check=True)
print("1")
"""


def test_array_tasks_get_every_root(
    example_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What --slurm-tasks passes on to the tasks; the real cluster runs tests/e2e/test_slurm.py.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(python=sys.executable))
    (bin_dir / "sbatch").chmod(0o755)
    roots = ("--media-root", str(example_data / "images"), "--media-root", str(example_data / "videos"))
    single, spread = tmp_path / "single", tmp_path / "spread"
    shard(example_data / "data.txt", single, *roots)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    shard(example_data / "data.txt", spread, *roots, "--slurm-tasks", "2")
    assert json.loads((spread / "manifest.json").read_text())["totals"]["rejected"] == 0
    tars = sorted(p.relative_to(single) for p in single.rglob("*.tar"))
    assert tars == sorted(p.relative_to(spread) for p in spread.rglob("*.tar")) and tars
    assert all((single / t).read_bytes() == (spread / t).read_bytes() for t in tars)
