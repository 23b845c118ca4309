"""One record -> canonical sample + members, in process: the schema round trip and failure paths."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

import data_tools.conversion as conversion
from data_tools.conversion import ConvertOptions, convert_record
from data_tools.sample import ImagePart, Sample, TextPart, VideoPart


def test_sample_round_trips_through_json(media: dict[str, Path]) -> None:
    png = base64.b64encode(media["one.png"].read_bytes()).decode()
    record = {
        "id": 7,
        "system_prompt": "sys",
        "image": [str(media["rotated.jpg"]), "data:image/png;base64," + png],
        "video": str(media["short.mp4"]),
        "num_frames": 2,
        "conversations": [
            {"from": "human", "value": "<image><video>\nand <image>"},
            {"from": "gpt", "value": "ok"},
        ],
    }
    out = convert_record(3, 4, record, "src", Path("/unused"), ConvertOptions())
    assert out.code is None, out.reason
    assert [name for name, _ in out.members] == ["json", "img0.jpg", "vid0.mp4", "img1.png"]
    sample = Sample.from_json(out.members[0][1])
    assert sample.to_json() == out.members[0][1]
    assert (sample.key, sample.source, sample.index, sample.id, sample.system) == (
        "000000003",
        "src",
        3,
        "7",
        "sys",
    )
    user = sample.turns[0].parts
    assert [type(p) for p in user] == [ImagePart, VideoPart, TextPart, ImagePart]
    assert (user[0].width, user[0].height) == (427, 640)
    assert (user[1].frames, user[1].num_frames) == (3, 2)
    assert user[3].origin == "data:image/png;base64,..." and user[3].bytes == media["one.png"].stat().st_size
    assert [p.member for p in sample.media] == ["img0.jpg", "vid0.mp4", "img1.png"]
    assert (out.images, out.videos, out.media_bytes) == (2, 1, sum(len(d) for _, d in out.members[1:]))


def test_schema_version_is_checked() -> None:
    with pytest.raises(ValueError, match="re-run data_tools/shard.py"):
        Sample.from_json(b'{"schema": 99, "key": "000000001", "turns": []}')


def test_an_unexpected_failure_rejects_the_record_not_the_run(monkeypatch) -> None:
    def boom(record, media_roots):
        raise KeyError("surprise")

    monkeypatch.setattr(conversion, "parse_record", boom)
    out = convert_record(0, 1, {"id": "x"}, "src", Path("."), ConvertOptions())
    assert (out.code, out.members, out.id) == ("converter_error", None, "x")
    assert "KeyError('surprise')" in out.reason


@pytest.mark.parametrize(
    "record, code",
    [
        (
            {"conversations": [{"from": "human", "value": "q\udc80"}, {"from": "gpt", "value": "a"}]},
            "bad_text",
        ),
        (
            {
                "image": "a\u0000b.jpg",
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            },
            "bad_media_field",
        ),
    ],
)
def test_text_and_paths_that_are_not_valid_unicode_or_paths(tmp_path: Path, record: dict, code: str) -> None:
    out = convert_record(0, 1, record, "src", tmp_path, ConvertOptions())
    assert out.code == code, out.reason
