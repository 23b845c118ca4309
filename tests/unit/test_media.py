"""Every accepted oddity and every rejection reason of media validation, on real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_tools.formats import MediaRef
from data_tools.media import probe_image, probe_video, read_media
from data_tools.sample import Rejected

ACCEPTED_IMAGES = {
    # name: (width, height, format, member extension), width/height after EXIF orientation
    "gray.png": (512, 512, "png", "png"),
    "palette.png": (640, 427, "png", "png"),
    "rgba.png": (64, 64, "png", "png"),
    "cmyk.jpg": (640, 427, "jpeg", "jpg"),
    "sixteen.png": (512, 512, "png", "png"),
    "rotated.jpg": (427, 640, "jpeg", "jpg"),
    "one.png": (1, 1, "png", "png"),
    "large.jpg": (8000, 6000, "jpeg", "jpg"),
    "photo.webp": (640, 427, "webp", "webp"),
    "PHOTO.JPG": (640, 427, "jpeg", "jpg"),
    "progressive.jpg": (640, 427, "jpeg", "jpg"),
    "my photo.v2.final.jpeg": (640, 427, "jpeg", "jpg"),
    "png_named.jpg": (50, 40, "png", "png"),
    "anim.gif": (14, 25, "gif", "gif"),
    "multipage.tif": (10, 15, "tiff", "tiff"),
    "flower.jpg": (640, 427, "jpeg", "jpg"),
}

REJECTED_IMAGES = {
    "text.jpg": "not_an_image",
    "truncated.jpg": "truncated_image",
    "truncated_progressive.jpg": "truncated_image",
    "truncated.png": "truncated_image",
    "bomb.png": "image_too_large",
    "bikes.mp4": "not_an_image",
    "truncated.gif": "truncated_image",
}

ACCEPTED_VIDEOS = {
    # name: (width, height, frames, fps, duration)
    "bikes.mp4": (640, 272, 250, 25.0, 10.0),
    "carphone.mp4": (176, 144, 120, 29.97003, 4.004),
    "short.mp4": (64, 48, 3, 10.0, 0.3),
    "one_frame.mp4": (64, 48, 1, 10.0, 0.1),
    "vfr.mp4": (64, 48, 12, 8.275862, 1.45),
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
