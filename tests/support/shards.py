"""Shard sets the tests build with the real converter: a small one for pipeline tests (three sources
up-, down- and exactly sampled, real photographs and text-only samples, many small shards, one of
them empty of planned samples most epochs), a text-only mix, and the dataset of every format, oddity
and rejection reason that tests/e2e/test_shard_cli.py converts; plus running shard.py as the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import webdataset as wds

from data_tools.samples import PHOTOS
from data_tools.shard import main as shard_main
from tests.support import REPO
from tests.support.media import ACCEPTED_IMAGES, ACCEPTED_VIDEOS


def build_shards(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    images = [
        {
            "id": f"img{i}",
            "image": str(PHOTOS[i % len(PHOTOS)]),
            "conversations": [
                {"from": "human", "value": f"<image>\nDescribe picture {i}."},
                {"from": "gpt", "value": "It shows " + "something " * (1 + i % 5) + f"({i})."},
            ],
        }
        for i in range(12)
    ]
    text = [
        {
            "id": f"txt{i}",
            "conversations": [
                {"from": "human", "value": f"What is {i} + {i}?"},
                {"from": "gpt", "value": f"{2 * i}."},
                {"from": "human", "value": "And times two?" * (1 + i % 3)},
                {"from": "gpt", "value": f"{4 * i}."},
            ],
        }
        for i in range(40)
    ]
    mixed = [
        {
            "id": f"mix{i}",
            "system_prompt": "Be brief.",
            "image": str(PHOTOS[(i + 1) % len(PHOTOS)]),
            "conversations": [
                {"from": "human", "value": f"Question {i}? <image>"},
                {"from": "gpt", "value": f"Answer {i}."},
            ],
        }
        for i in range(9)
    ]
    (root / "images.json").write_text(json.dumps(images))
    (root / "text.jsonl").write_text("\n".join(json.dumps(r) for r in text))
    (root / "mixed.json").write_text(json.dumps(mixed))
    (root / "data.txt").write_text("images.json 0.024\ntext.jsonl 0.025\nmixed.json 0.009\n")
    out = root / "shards"
    assert (
        shard_main(
            [str(root / "data.txt"), "--out", str(out), "--workers", "1", "--shard-samples", "5", "-q"]
        )
        == 0
    )
    return out


def build_mix_shards(root: Path) -> Path:
    """Three text-only sources at 50 / 25 / 25 % of a 1,200-sample epoch, each JSONL written sorted by
    answer length (as a JSON sorted by task, length or date is), in shards of 100 samples."""
    root.mkdir(parents=True, exist_ok=True)
    counts = {"long": 600, "mid": 300, "short": 300}
    for name, n in counts.items():
        records = [
            {
                "id": f"{name}{i}",
                "conversations": [
                    {"from": "human", "value": f"Tell me about {name} item {i}."},
                    {"from": "gpt", "value": " ".join(["word"] * (1 + i * 40 // n))},
                ],
            }
            for i in range(n)
        ]
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (root / "data.txt").write_text("".join(f"{name}.jsonl {n / 1000}\n" for name, n in counts.items()))
    out = root / "shards"
    assert (
        shard_main(
            [str(root / "data.txt"), "--out", str(out), "--workers", "1", "--shard-samples", "100", "-q"]
        )
        == 0
    )
    return out


TURNS = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A picture."}]


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def shard(data_txt: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run("data_tools/shard.py", data_txt, "--out", out, "-q", *extra, check=check)


def dump(path: Path, records: list, jsonl: bool = False) -> None:
    text = (
        "\n".join(json.dumps(r, ensure_ascii=False) for r in records)
        if jsonl
        else json.dumps(records, indent=1)
    )
    path.write_text(text, encoding="utf-8")


# id -> expected rejection code, for every sample of the dataset that must be rejected
EXPECTED_REJECTIONS = {
    "missing": "missing_media",
    "empty-file": "empty_media",
    "text-as-jpg": "not_an_image",
    "truncated-jpg": "truncated_image",
    "truncated-png": "truncated_image",
    "bomb": "image_too_large",
    "video-as-image": "not_an_image",
    "too-many-placeholders": "media_count_mismatch",
    "too-many-images": "media_count_mismatch",
    "no-answer-turn": "no_assistant_turn",
    "empty-answer": "empty_answer",
    "bad-role": "unknown_role",
    "number-text": "bad_text",
    "empty-conv": "empty_conversation",
    "not-a-conversation": "unknown_format",
    "truncated-video": "undecodable_video",
    "truncated-faststart": "truncated_video",
    "audio-only": "no_video_stream",
    "image-as-video": "not_a_video",
}


def build_dataset(root: Path, media: dict[str, Path]) -> Path:
    """data.txt + five sources under `root`, media copied to root/media with their odd names."""
    mdir = root / "media"
    mdir.mkdir(parents=True)
    for name, path in media.items():
        shutil.copy(path, mdir / name)

    def img(name: str, id_: str, turns=TURNS) -> dict:
        return {"id": id_, "image": f"media/{name}", "conversations": turns}

    dump(root / "oddities.json", [img(name, name) for name in sorted(ACCEPTED_IMAGES)])
    broken = [
        img("nope.jpg", "missing"),
        img("empty.jpg", "empty-file"),
        img("text.jpg", "text-as-jpg"),
        img("truncated.jpg", "truncated-jpg"),
        img("truncated.png", "truncated-png"),
        img("bomb.png", "bomb"),
        img("bikes.mp4", "video-as-image"),
        img("flower.jpg", "too-many-placeholders", [{"from": "human", "value": "<image><image>"}, TURNS[1]]),
        {"id": "too-many-images", "image": ["media/flower.jpg", "media/one.png"], "conversations": TURNS},
        {"id": "no-answer-turn", "conversations": TURNS[:1], "image": "media/flower.jpg"},
        {
            "id": "empty-answer",
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}],
        },
        {
            "id": "bad-role",
            "conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}],
        },
        {
            "id": "number-text",
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 42}],
        },
        {"id": "empty-conv", "conversations": []},
        {"id": "not-a-conversation", "text": "just text"},
        {
            "id": "ok-between-bad-ones",
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
        },
    ]
    dump(root / "broken.jsonl", broken, jsonl=True)
    dump(
        root / "formats.jsonl",
        [
            {
                "id": "llava",
                "image": ["media/flower.jpg", "media/gray.png"],
                "conversations": [
                    {"from": "human", "value": "<image>\n<image>\nSame?"},
                    {"from": "gpt", "value": "No."},
                ],
            },
            {
                "id": "xcomposer",
                "image": ["media/photo.webp"],
                "conversations": [
                    {"from": "user", "value": "<ImageHere>Describe."},
                    {"from": "assistant", "value": "Roof."},
                ],
            },
            {
                "id": "minicpm",
                "image": {"<image_00>": "media/one.png", "<image_01>": "media/rgba.png"},
                "conversations": [
                    {"role": "user", "content": "<image_01> vs <image_00>"},
                    {"role": "assistant", "content": "Différent."},
                ],
            },
            {
                "id": "openai",
                "messages": [
                    {"role": "system", "content": "Short answers."},
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": "media/anim.gif"},
                            {"type": "text", "text": "Hi"},
                        ],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                ],
            },
            {
                "id": "text-only",
                "conversations": [
                    {"from": "user", "value": "你好"},
                    {"from": "assistant", "value": "你好！"},
                ],
            },
        ],
        jsonl=True,
    )
    videos = [
        {
            "id": name,
            "video": f"media/{name}",
            "num_frames": 4,
            "conversations": [
                {"from": "human", "value": "<video>\nWhat happens?"},
                {"from": "gpt", "value": "x"},
            ],
        }
        for name in sorted(ACCEPTED_VIDEOS)
    ]
    for id_, name in [
        ("truncated-video", "truncated.mp4"),
        ("truncated-faststart", "truncated_faststart.mp4"),
        ("audio-only", "audio_only.m4a"),
        ("image-as-video", "jpeg_named.mp4"),
    ]:
        videos.append({"id": id_, "video": f"media/{name}", "conversations": videos[0]["conversations"]})
    dump(root / "videos.json", videos)
    dump(
        root / "text.json",
        [
            {
                "id": f"t{i}",
                "conversations": [
                    {"from": "human", "value": f"{i}+{i}?"},
                    {"from": "gpt", "value": str(2 * i)},
                ],
            }
            for i in range(9)
        ],
    )
    data_txt = root / "data.txt"
    data_txt.write_text(
        "# every format, oddity and failure\noddities.json 0.03\nbroken.jsonl 0.001\n"
        "formats.jsonl 0.005\nvideos.json   0.0025  # rounds half up to 3\ntext.json 0.004\n"
    )
    return data_txt


def read_samples(out: Path, entry: dict) -> list[dict]:
    urls = [str(out / s["path"]) for s in entry["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
