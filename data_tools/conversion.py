"""One source file -> canonical samples with their media bytes, in a seeded order, on N processes.

`convert_record` is the whole per-record job (parse the format, read and validate every media
file, build the canonical sample); `convert_source` runs it over a file's records on a process
pool with a bounded window of chunks in flight, and yields the results in the order it is given.
That order is `record_order`: a permutation of the input that depends only on the seed and the
source's name, because a JSON sorted by task, length or date must not train in that order.
Records are read one by one at the byte spans the scan pass noted (`fingerprint_source`), so the
shards written from the results do not depend on the number of workers or array tasks, and
memory does not depend on the size of the file (24 bytes a record for the index aside).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.formats import Draft, MediaRef, parse_record
from data_tools.frames import FrameExtraction, extract_frames, frames_record
from data_tools.media import DEFAULT_MAX_PIXELS, media_stat, probe_image, probe_video, read_media
from data_tools.sample import ImagePart, Rejected, Sample, TextPart, Turn, VideoPart
from data_tools.sources import RecordIndex, RecordReader

logger = logging.getLogger(__name__)

_CHUNK = 8  # records per task sent to a worker
_WINDOW_PER_WORKER = 4  # chunks in flight per worker at most: keeps workers busy
_IN_FLIGHT_BYTES = 256 << 20  # ...and converted bytes waiting in the parent, about at most


@dataclass(frozen=True)
class ConvertOptions:
    # Relative media paths resolve against the first of these that holds the file, else next to the JSON.
    media_roots: tuple[Path, ...] = ()
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    video_frames: FrameExtraction | None = None  # store videos as their sampled frames (--video-frames)


@dataclass
class Converted:
    """The outcome for one record: members to write, or why it was rejected."""

    index: int
    line: int
    key: str
    id: str | None
    members: list[tuple[str, bytes]] | None = None  # (suffix, bytes); "json" first
    code: str | None = None
    reason: str | None = None
    images: int = 0
    videos: int = 0
    frames: int = 0  # video frames stored as images (--video-frames)
    text_chars: int = 0
    media_bytes: int = 0


def sample_key(index: int) -> str:
    return f"{index:09d}"


def convert_record(
    index: int, line: int, record: Any, source: str, json_dir: Path, opts: ConvertOptions
) -> Converted:
    """Convert one input record; never raises for bad data (a rejection is a result)."""
    raw_id = record.get("id") if isinstance(record, dict) else None
    out = Converted(index=index, line=line, key=sample_key(index), id=None if raw_id is None else str(raw_id))
    try:
        draft = parse_record(record, media_roots=opts.media_roots or (json_dir,))
        sample, members = _materialize(draft, out, source, opts)
        sample_json = _encode(sample)
    except Rejected as e:
        out.code, out.reason = e.code, e.reason
        return out
    except Exception as e:  # noqa: BLE001 - one sample must never end a long conversion
        logger.exception("record %d of %s: unexpected error", index, source)
        out.code = "converter_error"
        out.reason = f"the converter failed on this record ({e!r}); please report it with the record"
        return out
    out.members = [("json", sample_json), *members]
    out.text_chars = sum(len(p.text) for t in sample.turns for p in t.parts if isinstance(p, TextPart))
    out.text_chars += len(sample.system or "")
    return out


def _encode(sample: Sample) -> bytes:
    try:
        return sample.to_json()
    except UnicodeEncodeError as e:
        bad = e.object[e.start : e.end] if isinstance(e.object, str) else "?"
        raise Rejected(
            "bad_text",
            f"the text holds {bad!r}, an unpaired UTF-16 surrogate (a cut emoji?), "
            f"which is not valid Unicode; fix the text",
        ) from None


def _materialize(
    draft: Draft, out: Converted, source: str, opts: ConvertOptions
) -> tuple[Sample, list[tuple[str, bytes]]]:
    members: list[tuple[str, bytes]] = []
    turns = []
    for role, parts in draft.turns:
        new_parts: list[TextPart | ImagePart | VideoPart] = []
        for part in parts:
            if isinstance(part, str):
                new_parts.append(TextPart(text=part))
                continue
            data = read_media(part)
            stored = None
            if part.kind == "image":
                info = probe_image(data, part.origin, opts.max_image_pixels)
                member = f"img{out.images}.{info.ext}"
                out.images += 1
                new_parts.append(
                    ImagePart(
                        member=member,
                        width=info.width,
                        height=info.height,
                        format=info.format,
                        bytes=len(data),
                        origin=part.origin,
                    )
                )
            else:
                vinfo = probe_video(data, part.origin)
                member = f"vid{out.videos}.{vinfo.ext}"
                frames: dict[str, Any] = {}
                if opts.video_frames is not None:
                    # The frames training would sample, stored as images in place of the video.
                    clip, images = extract_frames(data, part.origin, opts.video_frames, part.num_frames)
                    names = [f"vid{out.videos}.frame{j}.{opts.video_frames.ext}" for j in range(len(images))]
                    stored = list(zip(names, images))
                    member, frames = names[0], frames_record(clip, names)
                    out.frames += len(images)
                out.videos += 1
                new_parts.append(
                    VideoPart(
                        member=member,
                        width=vinfo.width,
                        height=vinfo.height,
                        frames=vinfo.frames,
                        fps=vinfo.fps,
                        duration=vinfo.duration,
                        format=vinfo.format,
                        bytes=len(data),
                        num_frames=part.num_frames,
                        origin=part.origin,
                        **frames,
                    )
                )
            for name, blob in stored or [(member, data)]:
                members.append((name, blob))
                out.media_bytes += len(blob)
        turns.append(Turn(role=role, parts=new_parts))  # type: ignore[arg-type]
    sample = Sample(key=out.key, source=source, index=out.index, id=out.id, system=draft.system, turns=turns)
    return sample, members


def _convert_chunk(
    chunk: list[tuple[int, int, Any]], source: str, json_dir: Path, opts: ConvertOptions
) -> list[Converted]:
    return [convert_record(i, line, rec, source, json_dir, opts) for i, line, rec in chunk]


def record_order(seed: int, source: str, count: int) -> np.ndarray:
    """The input indices of a source's records in the order they are converted and written.

    A pure function of (seed, source name): never Python's hash(), which is salted per process.
    """
    name = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, name]).permutation(count)


def _read_records(index: RecordIndex, order: Sequence[int]) -> Iterator[tuple[int, int, Any]]:
    with open(index.file, "rb") as f:
        for k in order:
            yield int(k), index.line(k), index.read(f, k)


def convert_source(
    index: RecordIndex, source: str, opts: ConvertOptions, workers: int, order: Sequence[int]
) -> Iterator[Converted]:
    """Convert the records of `index.file` whose input indices are `order`, in that order."""
    file = index.file
    records = _read_records(index, order)
    if workers <= 1:
        for i, line, rec in records:
            yield convert_record(i, line, rec, source, file.parent, opts)
        return
    # spawn, not fork: the parent may hold threads (progress bar) that fork would copy mid-lock.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: deque[Future[list[Converted]]] = deque()
        exhausted = False
        seen_bytes, seen_chunks = 0, 0
        while True:
            # Results wait in this process until written, so the window shrinks when chunks are
            # big (videos): memory stays near _IN_FLIGHT_BYTES whatever the media sizes are.
            per_chunk = seen_bytes / seen_chunks if seen_chunks else 0
            window = workers * _WINDOW_PER_WORKER
            if per_chunk:
                window = max(workers, min(window, int(_IN_FLIGHT_BYTES // per_chunk)))
            while not exhausted and len(pending) < window:
                chunk = [r for _, r in zip(range(_CHUNK), records)]
                if not chunk:
                    exhausted = True
                    break
                pending.append(pool.submit(_convert_chunk, chunk, source, file.parent, opts))
            if not pending:
                return
            results = pending.popleft().result()
            seen_bytes += sum(r.media_bytes for r in results)
            seen_chunks += 1
            yield from results


def fingerprint_source(
    file: Path, source: str, opts: ConvertOptions, settings: dict[str, Any]
) -> tuple[RecordIndex, str]:
    """(where each record lies, fingerprint) of a source: the fingerprint changes when the JSON,
    any media file it names (size, mtime, and which media root it resolves in) or any setting that
    shapes the output changes. Raises DataError on bad JSON."""
    h = hashlib.sha256(repr(sorted(settings.items())).encode())
    h.update(f"{source}\0{opts}\0".encode())
    roots = opts.media_roots or (file.parent,)
    reader = RecordReader(file, index=True)
    for _, _, record in reader:
        try:
            refs: list[MediaRef] = parse_record(record, media_roots=roots).media
        except Exception:  # noqa: BLE001 - rejected (or failing) records name no media to watch
            refs = []
        for ref in refs:
            h.update(media_stat(ref).encode() + b"\0")
        h.update(b"\1")
    h.update(reader.sha256.encode())
    return reader.index, h.hexdigest()
