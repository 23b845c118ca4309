"""Every accepted oddity and every rejection reason of media validation, on real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_tools.formats import MediaRef
from data_tools.media import probe_image, probe_video, read_media
from data_tools.sample import Rejected
from tests.support.media import ACCEPTED_IMAGES, ACCEPTED_VIDEOS

REJECTED_IMAGES = {
    "text.jpg": "not_an_image",
    "truncated.jpg": "truncated_image",
    "truncated_progressive.jpg": "truncated_image",
    "truncated.png": "truncated_image",
    "bomb.png": "image_too_large",
    "bikes.mp4": "not_an_image",
    "truncated.gif": "truncated_image",
}


REJECTED_VIDEOS = {
    "truncated.mp4": "undecodable_video",
    "truncated_faststart.mp4": "truncated_video",
    "garbage_frames.mp4": "undecodable_video",
    "audio_only.m4a": "no_video_stream",
    "jpeg_named.mp4": "not_a_video",
    "text.jpg": "not_a_video",
}


@pytest.mark.parametrize("name", sorted(ACCEPTED_IMAGES))
def test_accepted_images(media: dict[str, Path], name: str) -> None:
    info = probe_image(media[name].read_bytes(), name)
    assert (info.width, info.height, info.format, info.ext) == ACCEPTED_IMAGES[name]


@pytest.mark.parametrize("name", sorted(REJECTED_IMAGES))
def test_rejected_images(media: dict[str, Path], name: str) -> None:
    with pytest.raises(Rejected) as e:
        probe_image(media[name].read_bytes(), name)
    assert e.value.code == REJECTED_IMAGES[name]
    assert repr(name) in e.value.reason


def test_bomb_is_judged_by_the_explicit_limit(media: dict[str, Path]) -> None:
    data = media["large.jpg"].read_bytes()  # 48 Mpx: legal by default
    assert probe_image(data, "large.jpg").width == 8000
    with pytest.raises(Rejected) as e:
        probe_image(data, "large.jpg", max_pixels=8000 * 6000 - 1)
    assert e.value.code == "image_too_large" and "48000000 pixels" in e.value.reason


@pytest.mark.parametrize("name", sorted(ACCEPTED_VIDEOS))
def test_accepted_videos(media: dict[str, Path], name: str) -> None:
    info = probe_video(media[name].read_bytes(), name)
    assert (info.width, info.height, info.frames, info.fps, info.duration) == ACCEPTED_VIDEOS[name]
    assert info.ext == "mp4"


@pytest.mark.parametrize("name", sorted(REJECTED_VIDEOS))
def test_rejected_videos(media: dict[str, Path], name: str) -> None:
    with pytest.raises(Rejected) as e:
        probe_video(media[name].read_bytes(), name)
    assert e.value.code == REJECTED_VIDEOS[name]


def test_read_media_reasons(media: dict[str, Path], tmp_path: Path) -> None:
    def code(path: Path) -> str:
        with pytest.raises(Rejected) as e:
            read_media(MediaRef(kind="image", origin=path.name, path=path))
        return e.value.code

    assert code(tmp_path / "nope.jpg") == "missing_media"
    assert code(media["empty.jpg"]) == "empty_media"
    assert code(tmp_path) == "unreadable_media"
    assert code(media["flower.jpg"] / "inside-a-file.jpg") == "unreadable_media"  # ENOTDIR
    locked = tmp_path / "locked.jpg"
    locked.write_bytes(media["flower.jpg"].read_bytes())
    locked.chmod(0)
    if open_is_refused(locked):  # root reads anything
        assert code(locked) == "unreadable_media"
    assert read_media(MediaRef(kind="image", origin="x", data=b"abc")) == b"abc"


def open_is_refused(path: Path) -> bool:
    try:
        path.open("rb").close()
    except PermissionError:
        return True
    return False
