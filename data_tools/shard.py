"""Convert conversation JSON + media into validated WebDataset shards with a mixing manifest.

    python data_tools/shard.py data.txt --out shards/ [--media-root DIR ...] [--workers N]
                               [--shard-size 1G] [--shard-samples 10000] [--seed 0]
                               [--video-frames N | --video-fps F] [--video-frame-format png]

`data.txt` lists `<json path> <samples per epoch, in thousands>` lines (InternLM-XComposer).
Every sample is validated; rejected ones go to `shards/rejected.jsonl` with a reason and the run
goes on. Output: `shards/<source>/<source>-NNNNNN.tar`, `shards/manifest.json`.

Each source's samples are written in a random order of its input, drawn from --seed and the
source's name (conversion.record_order): a JSON sorted by task, length or date must not train in
that order. The scan pass notes where each record lies in its file, and conversion reads them in
that order by seeking: memory holds 24 bytes a record, never the records. The same inputs and
seed give byte-identical shards whatever --workers or --slurm-tasks is; a re-run reuses the shards
of every source whose JSON, media files and settings (the seed included) did not change.
rejected.jsonl lists each source's rejections in input order. Exit codes: 0 done (rejections
included), 2 bad input (data.txt, missing or unparsable JSON) with nothing written.

Relative media paths resolve against each JSON file's folder, or with --media-root against the
first given folder that holds the file: lmms-finetune keeps images and videos apart
(`--media-root example_data/images --media-root example_data/videos`).

With --video-frames N (or --video-fps F), every video is decoded here, once, and the sample
stores its sampled frames as images instead of the video (data_tools/frames.py): the frames
training would sample with the same data.video settings, a sample's num_frames first.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Run as a script, data_tools/ would come first on sys.path and its inspect.py would shadow
    # the standard library's; put the repository root there instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from array import array  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import IO, Any  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data_tools import __version__  # noqa: E402
from data_tools.conversion import Converted, ConvertOptions, convert_source, fingerprint_source, record_order  # noqa: E402
from data_tools.frames import FORMATS, FrameExtraction  # noqa: E402
from data_tools.manifest import (  # noqa: E402
    MANIFEST,
    REJECTED,
    Manifest,
    ShardEntry,
    SourceEntry,
    summary_table,
    write_atomic,
)
from data_tools.media import DEFAULT_MAX_PIXELS  # noqa: E402
from data_tools.sources import DataError, RecordIndex, SourceSpec, parse_data_txt  # noqa: E402
from data_tools.writer import ShardWriter  # noqa: E402

logger = logging.getLogger(__name__)
_PARTIAL = ".partial"


def parse_size(text: str) -> int:
    """'512M', '1G', '1.5GB', '4096' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 512M or 1G")
    value = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, got {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shard.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data_txt", type=Path, help="lines of `<json path> <samples per epoch in thousands>`")
    p.add_argument("--out", type=Path, required=True, help="output directory for shards and manifest")
    p.add_argument(
        "--media-root",
        dest="media_roots",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="folder that relative media paths resolve against (default: the JSON file's folder); "
        "repeatable: a path resolves against the first folder that holds it",
    )
    # One core stays with the main process, which writes and hashes the tars.
    p.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="conversion processes (default: one per core, less one for the writer)",
    )
    p.add_argument(
        "--shard-size",
        type=parse_size,
        default=parse_size("1G"),
        help="maximum bytes per shard, e.g. 512M (a single larger sample gets its own shard)",
    )
    p.add_argument("--shard-samples", type=int, default=10_000, help="maximum samples per shard")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="larger images are rejected as decompression bombs",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the order each source's samples are written in, and is stored in the "
        "manifest for epoch mixing",
    )
    p.add_argument("--force", action="store_true", help="re-convert every source even if unchanged")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    video = p.add_argument_group(
        "videos as frames: decode each video once here and store its sampled frames as images instead "
        "of the video, so training runs no video decoder (the frames data.video would sample, set alike)"
    )
    how = video.add_mutually_exclusive_group()
    how.add_argument(
        "--video-frames",
        type=int,
        metavar="N",
        help="N frames spread uniformly over each video (a sample's own num_frames wins)",
    )
    how.add_argument(
        "--video-fps",
        type=float,
        metavar="F",
        help="F frames per second of video, within --video-min-frames and --video-max-frames",
    )
    video.add_argument(
        "--video-min-frames",
        type=int,
        default=FrameExtraction.min_frames,
        metavar="N",
        help="with --video-fps: at least N frames per video (default %(default)s)",
    )
    video.add_argument(
        "--video-max-frames",
        type=int,
        default=None,
        metavar="N",
        help=f"at most N frames per video, a sample's num_frames included "
        f"(default {FrameExtraction.max_frames}, or --video-frames if larger)",
    )
    video.add_argument(
        "--video-frame-format",
        choices=sorted(FORMATS),
        default="jpeg",
        help="jpeg (quality 95, the default) or png (lossless: exactly the decoded pixels)",
    )
    slurm = p.add_argument_group(
        "on SLURM: K array tasks convert a share of every source each, then a "
        "merge job writes the shards (byte-identical to a single-machine run)"
    )
    slurm.add_argument("--slurm-tasks", type=int, metavar="K", help="submit K array tasks and a merge job")
    slurm.add_argument(
        "--slurm-args", default="", help='extra sbatch arguments, e.g. "--partition cpu --time 4:00:00"'
    )
    slurm.add_argument(
        "--wait", action="store_true", help="with --slurm-tasks: block until the merge job ends"
    )
    slurm.add_argument("--task", metavar="I/K", help=argparse.SUPPRESS)  # run by the array tasks
    slurm.add_argument("--merge", type=int, metavar="K", help=argparse.SUPPRESS)  # run by the merge job
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.workers < 1 or args.shard_samples < 1 or args.seed < 0:
        print("error: --workers and --shard-samples must be >= 1, --seed >= 0", file=sys.stderr)
        return 2
    try:
        args.video_extraction = frame_extraction(args)
        if args.slurm_tasks:
            return submit(args)
        if args.task:
            return run_task(args)
        return run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def frame_extraction(args: argparse.Namespace) -> FrameExtraction | None:
    """--video-frames / --video-fps and their companions, checked; None when videos stay videos."""
    if args.video_frames is None and args.video_fps is None:
        if (
            args.video_max_frames is not None
            or args.video_min_frames != FrameExtraction.min_frames
            or args.video_frame_format != "jpeg"
        ):
            raise DataError(
                "--video-min-frames, --video-max-frames and --video-frame-format need "
                "--video-frames N or --video-fps F"
            )
        return None
    max_frames = args.video_max_frames
    if max_frames is None:
        max_frames = max(FrameExtraction.max_frames, args.video_frames or 0)
    try:
        return FrameExtraction(
            num_frames=args.video_frames,
            fps=args.video_fps,
            min_frames=args.video_min_frames,
            max_frames=max_frames,
            format="png" if args.video_frame_format == "png" else "jpeg",
        )
    except ValueError as e:
        raise DataError(str(e)) from None


def _prepare(
    args: argparse.Namespace,
) -> tuple[list[SourceSpec], ConvertOptions, dict, dict[str, tuple[RecordIndex, str]]]:
    specs = parse_data_txt(args.data_txt)
    opts = ConvertOptions(
        media_roots=tuple(root.resolve() for root in args.media_roots),
        max_image_pixels=args.max_image_pixels,
        video_frames=args.video_extraction,
    )
    settings = {
        "converter": __version__,
        "shard_size": args.shard_size,
        "shard_samples": args.shard_samples,
        "seed": args.seed,
    }
    # Pass 1 reads every JSON file before anything is written: a syntax error in the last file
    # stops the run now, not hours in, and the fingerprints tell which sources are unchanged.
    # It also notes where each record lies, so conversion can read them in a shuffled order.
    scans = {}
    for spec in tqdm(specs, desc="scanning", unit="file", disable=args.quiet or None):
        scans[spec.name] = fingerprint_source(spec.file, spec.name, opts, {**settings, "path": spec.path})
    return specs, opts, settings, scans


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out: Path = args.out
    specs, opts, settings, scans = _prepare(args)
    old = _load_previous(out)
    for spec in specs:
        if (out / spec.name).exists() and not _owned(out / spec.name, spec.name):
            raise DataError(
                f"{out / spec.name} exists and was not written by shard.py; "
                f"choose another --out or move it away"
            )
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    known = {spec.name for spec in specs} | ({s.name for s in old.sources} if old else set())
    _remove_partials(out, known)

    entries: list[SourceEntry] = []
    converted_names: list[str] = []
    total = sum(len(index) for index, _ in scans.values())
    try:
        with tqdm(total=total, desc="converting", unit="sample", disable=args.quiet or None) as bar:
            for spec in specs:
                index, fingerprint = scans[spec.name]
                reused = _reusable(old, spec, fingerprint, out, args.force)
                if reused is not None:
                    reused.path, reused.epoch_samples = spec.path, spec.epoch_samples
                    entries.append(reused)
                    bar.update(len(index))
                    logger.info("%s: unchanged, reusing %d shards", spec.name, len(reused.shards))
                    continue
                entries.append(_convert(spec, index, fingerprint, opts, args, out, bar))
                converted_names.append(spec.name)
    except BaseException:
        _remove_partials(out, known)
        raise

    # Swap the new sources in only now that all of them are complete.
    for name in converted_names:
        final = out / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(out / (name + _PARTIAL), final)
    names = {e.name for e in entries}
    for stale in old.sources if old else []:
        if stale.name not in names and (out / stale.name).is_dir():
            shutil.rmtree(out / stale.name)

    manifest = Manifest(
        seed=args.seed,
        converter=__version__,
        sources=entries,
        options={
            **settings,
            "max_image_pixels": args.max_image_pixels,
            # The --media-root folders in order; None (each JSON's folder) as before.
            "media_root": [str(root) for root in opts.media_roots] or None,
            "video_frames": asdict(opts.video_frames) if opts.video_frames else None,
        },
    )
    _join_rejected(out, entries)
    write_atomic(out / MANIFEST, manifest.to_json())
    print_summary(manifest, time.perf_counter() - start, converted_names, out)
    if args.merge:
        shutil.rmtree(out / ".tasks", ignore_errors=True)
    lock.close()
    return 0


def _convert(
    spec: SourceSpec,
    index: RecordIndex,
    fingerprint: str,
    opts: ConvertOptions,
    args: argparse.Namespace,
    out: Path,
    bar: tqdm,
) -> SourceEntry:
    tmp = out / (spec.name + _PARTIAL)
    tmp.mkdir()
    writer = ShardWriter(tmp, spec.name, max_bytes=args.shard_size, max_samples=args.shard_samples)
    stats: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    results = (
        _task_results(args.out, spec.name, args.merge)
        if args.merge
        else convert_source(
            index, spec.name, opts, args.workers, record_order(args.seed, spec.name, len(index))
        )
    )
    # Each source keeps its own rejections beside its shards, so a reused source keeps them too.
    rejected = _Rejections(tmp / REJECTED)
    for result in results:
        bar.update(1)
        if result.members is None:
            reasons[result.code or "unknown"] += 1
            rejected.add(result.index, _rejection_line(spec, result))
            continue
        writer.write(result.key, result.members)
        stats.update(
            images=result.images,
            videos=result.videos,
            frames=result.frames,
            text_chars=result.text_chars,
            media_bytes=result.media_bytes,
            samples=1,
        )
    rejected.close()
    shards = [ShardEntry(**asdict(s)) for s in writer.close()]
    entry = SourceEntry(
        name=spec.name,
        path=spec.path,
        samples=stats["samples"],
        epoch_samples=spec.epoch_samples,
        rejected=sum(reasons.values()),
        rejected_by_reason=dict(sorted(reasons.items())),
        images=stats["images"],
        videos=stats["videos"],
        frames=stats["frames"],
        text_chars=stats["text_chars"],
        media_bytes=stats["media_bytes"],
        fingerprint=fingerprint,
        shards=shards,
    )
    return entry


def _rejection_line(spec: SourceSpec, result: Converted) -> bytes:
    line = {
        "source": spec.path,
        "index": result.index,
        "line": result.line,
        "id": result.id,
        "code": result.code,
        "reason": result.reason,
    }
    try:
        return (json.dumps(line, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:  # an id with an unpaired surrogate: escape it
        return (json.dumps(line) + "\n").encode()


class _Rejections:
    """A source's rejected.jsonl in input order, though its records arrive shuffled: people read
    it beside their JSON. Lines go to a scratch file as they come and `close` copies them out
    sorted by input index, so memory is 16 bytes a rejection, not the lines."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._scratch = tempfile.TemporaryFile(dir=path.parent)  # nameless: nothing to clean up
        self._where: array[int] = array("q")  # input index, scratch offset, ...

    def add(self, index: int, line: bytes) -> None:
        self._where.extend((index, self._scratch.tell()))
        self._scratch.write(line)

    def close(self) -> None:
        where = np.array(self._where, dtype=np.int64).reshape(-1, 2)
        with open(self._path, "wb") as out:
            for offset in where[np.argsort(where[:, 0]), 1]:
                self._scratch.seek(int(offset))
                out.write(self._scratch.readline())
        self._scratch.close()


# --- conversion as SLURM array tasks ----------------------------------------------------------


def _task_dir(out: Path, name: str) -> Path:
    return out / ".tasks" / name


def run_task(args: argparse.Namespace) -> int:
    """Array task I of K: convert the records at positions [I*n/K, (I+1)*n/K) of every source's
    shuffled order (not input indices) that needs it, into a stream of results; the merge job
    writes the K streams one after the other, so the shards are those of a single-machine run."""
    i, k = (int(x) for x in args.task.split("/"))
    specs, opts, _, scans = _prepare(args)
    old = _load_previous(args.out)
    for spec in specs:
        index, fingerprint = scans[spec.name]
        if _reusable(old, spec, fingerprint, args.out, args.force) is not None:
            continue
        n = len(index)
        share = record_order(args.seed, spec.name, n)[i * n // k : (i + 1) * n // k]
        part = _task_dir(args.out, spec.name) / f"part-{i:05d}.pkl"
        part.parent.mkdir(parents=True, exist_ok=True)
        tmp = part.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for result in convert_source(index, spec.name, opts, args.workers, share):
                pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, part)
    return 0


def _task_results(out: Path, name: str, k: int) -> Iterator[Any]:
    for i in range(k):
        part = _task_dir(out, name) / f"part-{i:05d}.pkl"
        if not part.is_file():
            raise DataError(
                f"{part} is missing: array task {i} of the conversion did not finish; see its log"
            )
        with open(part, "rb") as f:
            while True:
                try:
                    yield pickle.load(f)  # our own files, written by run_task
                except EOFError:
                    break


def submit(args: argparse.Namespace) -> int:
    """Check the inputs here, then submit K array tasks and a merge job depending on them."""
    k = args.slurm_tasks
    if k < 1:
        raise DataError("--slurm-tasks must be >= 1")
    _prepare(args)  # fatal input errors now, not in K jobs
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.out / ".tasks", ignore_errors=True)
    passthrough = [
        str(args.data_txt.resolve()),
        "--out",
        str(args.out.resolve()),
        "--workers",
        str(args.workers),
        "--shard-size",
        str(args.shard_size),
        "--shard-samples",
        str(args.shard_samples),
        "--max-image-pixels",
        str(args.max_image_pixels),
        "--seed",
        str(args.seed),
        "-q",
        *(x for root in args.media_roots for x in ("--media-root", str(root.resolve()))),
        *_video_args(args.video_extraction),
        *(["--force"] if args.force else []),
    ]
    script = os.path.abspath(__file__)
    base = [
        "sbatch",
        "--parsable",
        "--job-name",
        "mmloom-shard",
        *shlex.split(args.slurm_args),
        "--output",
        str(args.out.resolve() / ".tasks" / "slurm-%A_%a.out"),
    ]
    (args.out / ".tasks").mkdir()
    command = " ".join(shlex.quote(x) for x in [sys.executable, script, *passthrough])
    array = subprocess.run(
        [*base, f"--array=0-{k - 1}", "--wrap", f"{command} --task $SLURM_ARRAY_TASK_ID/{k}"],
        capture_output=True,
        text=True,
    )
    if array.returncode:
        raise DataError(f"sbatch failed: {array.stderr.strip()}")
    array_id = array.stdout.strip().split(";")[0]
    # kill-on-invalid-dep: if a task fails, the merge job ends (FAILED) instead of pending forever.
    merge = subprocess.run(
        [
            *base,
            f"--dependency=afterok:{array_id}",
            "--kill-on-invalid-dep=yes",
            *(["--wait"] if args.wait else []),
            "--wrap",
            f"{command} --merge {k}",
        ],
        capture_output=True,
        text=True,
    )
    if merge.returncode:
        raise DataError(f"the merge job failed ({merge.stderr.strip()}); see {args.out / '.tasks'}")
    print(f"array job {array_id} ({k} tasks), merge job {merge.stdout.strip().split(';')[0]}", flush=True)
    return 0


def _video_args(how: FrameExtraction | None) -> list[str]:
    if how is None:
        return []
    count = (
        ["--video-frames", str(how.num_frames)]
        if how.num_frames is not None
        else ["--video-fps", repr(how.fps)]
    )
    return [
        *count,
        "--video-min-frames",
        str(how.min_frames),
        "--video-max-frames",
        str(how.max_frames),
        "--video-frame-format",
        how.format,
    ]


def _load_previous(out: Path) -> Manifest | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        return Manifest.from_json(path.read_text(encoding="utf-8"), str(path))
    except ValueError as e:
        logger.warning("ignoring the existing manifest: %s", e)
        return None


def _reusable(
    old: Manifest | None, spec: SourceSpec, fingerprint: str, out: Path, force: bool
) -> SourceEntry | None:
    prev = old.source(spec.name) if old and not force else None
    if prev is None or prev.fingerprint != fingerprint:
        return None
    if not (out / spec.name / REJECTED).is_file():
        return None
    for shard in prev.shards:
        path = out / shard.path
        if not path.is_file() or path.stat().st_size != shard.bytes:
            logger.warning("%s: shard %s is missing or changed; converting again", spec.name, shard.path)
            return None
    return prev


def _join_rejected(out: Path, entries: list[SourceEntry]) -> None:
    """rejected.jsonl: every source's rejections, in data.txt order, streamed."""
    tmp = out / f".{REJECTED}.tmp"
    with open(tmp, "wb") as dst:
        for entry in entries:
            with open(out / entry.name / REJECTED, "rb") as src:
                shutil.copyfileobj(src, dst)
    os.replace(tmp, out / REJECTED)


def _remove_partials(out: Path, names: set[str]) -> None:
    for name in names:
        shutil.rmtree(out / (name + _PARTIAL), ignore_errors=True)


def _owned(path: Path, name: str) -> bool:
    """True for a source directory as shard.py writes it: its shards and rejected.jsonl only."""
    pattern = re.compile(rf"{re.escape(name)}-\d{{6}}\.tar|{re.escape(REJECTED)}")
    return path.is_dir() and all(pattern.fullmatch(p.name) for p in path.iterdir())


def _lock(out: Path) -> IO[str]:
    """Hold an exclusive lock on the output directory for the whole run."""
    f = open(out / ".shard.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise DataError(
            f"another shard.py is writing to {out}; wait for it or choose another --out"
        ) from None
    return f


def print_summary(manifest: Manifest, seconds: float, converted: list[str], out: Path) -> None:
    """The per-source table, totals and throughput."""
    print(summary_table(manifest, reused=[s.name for s in manifest.sources if s.name not in converted]))
    valid = sum(s.samples for s in manifest.sources)
    rejected = sum(s.rejected for s in manifest.sources)
    done = [s for s in manifest.sources if s.name in converted]
    mb = sum(s.media_bytes for s in done) / 1e6
    n = sum(s.samples + s.rejected for s in done)
    print(
        f"\n{valid} samples in {sum(len(s.shards) for s in manifest.sources)} shards, {rejected} rejected "
        f"(see {out / REJECTED}); converted {n} records, {mb:.1f} MB of media in {seconds:.2f} s: "
        f"{mb / max(seconds, 1e-9):.1f} MB/s, {n / max(seconds, 1e-9):.0f} samples/s"
    )
    how = manifest.options.get("video_frames")
    if how:
        frames, videos = sum(s.frames for s in manifest.sources), sum(s.videos for s in manifest.sources)
        print(
            f"videos stored as their sampled frames: {frames} frames of {videos} videos, "
            f"{FrameExtraction(**how).describe()}; training decodes no video"
        )
    for s in manifest.sources:
        if s.samples == 0 and s.epoch_samples > 0:
            print(
                f"warning: {s.path} has no valid samples but asks for {s.epoch_samples} per epoch; "
                f"fix its data or remove it from data.txt",
                file=sys.stderr,
            )


if __name__ == "__main__":
    from data_tools.shard import main as _main  # the package module, so workers can import it

    sys.exit(_main())
