"""Media validation at conversion time: read the bytes, prove they decode, record their geometry.

Images are opened with Pillow from the bytes (the extension is ignored) and checked against an
explicit pixel limit before any decoding (decompression bombs). Then they are proven whole as
cheaply as the format allows: a JPEG must have its end-of-image marker after the scan data, a
PNG must pass every chunk's CRC to IEND, anything else is decoded once. Videos are opened with
PyAV: a video stream must exist, every packet is demuxed (frame count, truncation) and the first
frame must decode. The bytes that go into the shard are the original bytes, untouched.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass

from PIL import Image, ImageFile, UnidentifiedImageError

from data_tools.formats import MediaRef
from data_tools.sample import Rejected

DEFAULT_MAX_PIXELS = 1 << 28  # 16384 x 16384; anything larger is treated as a decompression bomb

# Member extensions by detected format, so a JPEG named x.png is stored as .jpg.
_IMAGE_EXT = {
    "jpeg": "jpg",
    "png": "png",
    "webp": "webp",
    "gif": "gif",
    "tiff": "tiff",
    "bmp": "bmp",
    "mpo": "jpg",
    "ppm": "ppm",
    "ico": "ico",
    "jpeg2000": "jp2",
    "tga": "tga",
}
_VIDEO_EXT = {
    "mov,mp4,m4a,3gp,3g2,mj2": "mp4",
    "matroska,webm": "mkv",
    "avi": "avi",
    "mpegts": "ts",
    "flv": "flv",
    "gif": "gif",
    "mpeg": "mpg",
    "ogg": "ogv",
}
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str
    ext: str


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    frames: int
    fps: float
    duration: float
    format: str  # short container name, also the member extension: mp4, mkv, avi, ...
    ext: str


def read_media(ref: MediaRef) -> bytes:
    """The media's bytes; missing, unreadable and empty files are Rejected."""
    if ref.data is not None:
        data = ref.data
    else:
        assert ref.path is not None
        try:
            with open(ref.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise Rejected("missing_media", _not_found(ref)) from None
        except IsADirectoryError:
            raise Rejected(
                "unreadable_media", f"{ref.kind} {ref.origin!r} is a directory ({ref.path})"
            ) from None
        except PermissionError:
            raise Rejected(
                "unreadable_media",
                f"{ref.kind} {ref.origin!r} cannot be read (permission denied: {ref.path}); "
                f"check its permissions",
            ) from None
        except OSError as e:
            raise Rejected(
                "unreadable_media", f"{ref.kind} {ref.origin!r} cannot be read ({e.strerror}: {ref.path})"
            ) from None
        except ValueError as e:  # a NUL byte or an unpaired surrogate in the path
            raise Rejected(
                "bad_media_field", f"{ref.kind} path {ref.origin!r} is not a valid path ({e})"
            ) from None
    if not data:
        raise Rejected("empty_media", f"{ref.kind} {ref.origin!r} is an empty (0-byte) file; replace it")
    return data


def _not_found(ref: MediaRef) -> str:
    # The sample itself is named by its rejected.jsonl line (source, index, line, id).
    if len(ref.roots) <= 1:
        return (
            f"{ref.kind} {ref.origin!r} not found at {ref.path}; fix the path, or pass --media-root DIR "
            f"(repeatable) if paths are relative to other folders"
        )
    searched = ", ".join(str(root) for root in ref.roots)
    return (
        f"{ref.kind} {ref.origin!r} not found in any media root (searched in order: {searched}); "
        f"fix the path, or add the folder that holds it with another --media-root"
    )


def probe_image(data: bytes, origin: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Prove `data` is a whole, decodable image of at most `max_pixels`; return its geometry."""
    # The pixel limit is ours and explicit; Pillow's own (warning below 2x its default) is off.
    Image.MAX_IMAGE_PIXELS = None
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        kind = "a video" if _looks_like_video(data) else "not an image Pillow can read"
        raise Rejected("not_an_image", f"image {origin!r} is {kind}; give an image file") from None
    except Exception as e:  # noqa: BLE001 - Pillow's parsers raise many types on malformed headers
        raise Rejected("not_an_image", f"image {origin!r} has a broken header ({e!r}); replace it") from None
    width, height = img.size
    if width * height > max_pixels:
        raise Rejected(
            "image_too_large",
            f"image {origin!r} is {width}x{height} = {width * height} pixels, over the limit "
            f"of {max_pixels} (decompression-bomb guard); resize it or raise --max-image-pixels",
        )
    fmt = (img.format or "unknown").lower()
    try:
        # Pillow reads a PNG's eXIf chunk only by loading every pixel; most PNGs have none.
        orientation = img.getexif().get(0x0112) if fmt != "png" or b"eXIf" in data else None
        _check_complete(img, fmt, data)
    except Exception as e:  # noqa: BLE001 - likewise for malformed pixel data
        raise Rejected(
            "truncated_image",
            f"image {origin!r} does not decode ({e}); the file is truncated or corrupt, replace it",
        ) from None
    if orientation in _ROTATED:
        width, height = height, width
    return ImageInfo(width=width, height=height, format=fmt, ext=_IMAGE_EXT.get(fmt) or _safe_ext(fmt))


def _check_complete(img: Image.Image, fmt: str, data: bytes) -> None:
    """Raise if the image data is cut short or corrupt, as cheaply as each format allows."""
    if fmt in ("jpeg", "mpo"):
        # Pillow stops parsing at the first start-of-scan; a whole JPEG has its end-of-image
        # marker after it (0xFF inside scan data is byte-stuffed, so FFD9 cannot occur by chance).
        if data.rfind(b"\xff\xd9") < img.fp.tell():
            raise OSError("no end-of-image marker after the scan data")
    elif fmt == "png":
        # Every chunk's CRC up to IEND, without inflating the pixels; verify() wants a fresh image.
        Image.open(io.BytesIO(data)).verify()
    else:
        for frame in range(getattr(img, "n_frames", 1)):  # every frame of a GIF or TIFF
            img.seek(frame)
            img.load()


def probe_video(data: bytes, origin: str) -> VideoInfo:
    """Prove `data` is a video whose stream demuxes to the end and whose first frame decodes."""
    import av  # imported here: only video sources need it, and it is slow to import

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as e:  # noqa: BLE001 - FFmpeg's errors, and whatever a malformed header raises
        if _looks_like_video(data):
            raise Rejected(
                "undecodable_video",
                f"video {origin!r} cannot be opened ({e}); it looks truncated or corrupt, replace it",
            ) from None
        raise Rejected(
            "not_a_video", f"video {origin!r} is not a video file ({e}); give a video file"
        ) from None
    with container:
        if container.format.name.endswith("_pipe") or container.format.name == "image2":
            raise Rejected(
                "not_a_video",
                f"video {origin!r} is a still image ({container.format.name}); "
                f"give it as an image, not a video",
            )
        if not container.streams.video:
            what = "audio only" if container.streams.audio else "no video stream"
            raise Rejected("no_video_stream", f"video {origin!r} has {what}; give a file with a video track")
        stream = container.streams.video[0]
        first = None
        frames = 0
        last_pts = None
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                frames += 1
                if packet.pts is not None:
                    last_pts = packet.pts if last_pts is None else max(last_pts, packet.pts)
                if first is None:
                    for frame in packet.decode():
                        first = frame
                        break
            if first is None:
                for frame in stream.codec_context.decode(None):  # flush: decoders with delay
                    first = frame
                    break
        except Exception as e:  # noqa: BLE001
            raise Rejected(
                "undecodable_video",
                f"video {origin!r} breaks after {frames} frames ({e}); it is truncated or corrupt, "
                f"re-encode or replace it",
            ) from None
        if first is None or frames == 0:
            raise Rejected(
                "undecodable_video",
                f"video {origin!r} has no decodable frame; it is truncated or corrupt, replace it",
            )
        if stream.frames and frames < stream.frames:
            # The index (e.g. an mp4 moov written up front) promises frames the data no longer has.
            raise Rejected(
                "truncated_video",
                f"video {origin!r} is truncated: {frames} of its {stream.frames} frames are present; "
                f"replace it with the whole file",
            )
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        duration = _duration(container, stream, last_pts, frames, fps)
        name = container.format.name
        fmt = _VIDEO_EXT.get(name) or _safe_ext(name.split(",")[0])
        return VideoInfo(
            width=first.width,
            height=first.height,
            frames=frames,
            fps=round(fps, 6),
            duration=round(duration, 6),
            format=fmt,
            ext=fmt,
        )


def _duration(container, stream, last_pts, frames: int, fps: float) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    if last_pts is not None and stream.time_base is not None:
        return float(last_pts * stream.time_base) + (1 / fps if fps else 0)
    return frames / fps if fps else 0.0


def _safe_ext(name: str) -> str:
    # Becomes part of a tar member name: letters and digits only.
    return re.sub(r"[^a-z0-9]", "", name.lower()) or "bin"


def _looks_like_video(data: bytes) -> bool:
    head = data[:16]
    return head[4:8] == b"ftyp" or head[:4] == b"\x1aE\xdf\xa3" or (head[:4] == b"RIFF" and b"AVI" in head)


def media_stat(ref: MediaRef) -> str:
    """What a re-run compares to know a media file is unchanged: size and mtime, or 'missing'."""
    if ref.path is None:
        return f"inline:{len(ref.data or b'')}"
    try:
        st = os.stat(ref.path)
    except (OSError, ValueError):
        return f"{ref.path!r}:missing"
    # ctime and inode too: a file swapped in with its old mtime (cp -p, rsync -a) still changes them.
    return f"{ref.path!r}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
