"""The manifest: what a shard directory holds, read by the trainer to plan every epoch.

`<shards>/manifest.json`:

    {"format": "mmloom-shards", "version": 1, "converter": "0.1.0", "seed": 0,
     "sources": [{"name": "coco", "path": "coco.json" (as written in data.txt),
                  "samples": 9998 (valid), "epoch_samples": 10000, "rejected": 2,
                  "rejected_by_reason": {"missing_media": 2}, "images": 9998, "videos": 0,
                  "frames": 0 (video frames stored as images, shard.py --video-frames),
                  "text_chars": 1234567, "media_bytes": 987654321, "fingerprint": "<sha256>",
                  "shards": [{"path": "coco/coco-000000.tar", "samples": 5000,
                              "bytes": 493827072, "sha256": "<hex>"}, ...]}, ...],
     "totals": {...}}

`<shards>/rejected.jsonl` holds one line per rejected sample:
`{"source", "index", "line", "id", "code", "reason"}`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "mmloom-shards"
VERSION = 1
MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"


@dataclass(kw_only=True)
class ShardEntry:
    path: str
    samples: int
    bytes: int
    sha256: str


@dataclass(kw_only=True)
class SourceEntry:
    name: str
    path: str
    samples: int
    epoch_samples: int
    rejected: int
    rejected_by_reason: dict[str, int]
    images: int
    videos: int
    frames: int = 0  # video frames stored as images instead of videos (--video-frames)
    text_chars: int
    media_bytes: int
    fingerprint: str
    shards: list[ShardEntry] = field(default_factory=list)

    @property
    def sampling(self) -> str:
        """'up x2.50', 'down x0.40', 'all' or 'none': how the epoch count relates to what exists."""
        if self.epoch_samples == self.samples:
            return "all"
        if self.samples == 0:
            return "none (no valid samples)" if self.epoch_samples else "all"
        ratio = self.epoch_samples / self.samples
        return f"{'up' if ratio > 1 else 'down'} x{ratio:.2f}"


@dataclass(kw_only=True)
class Manifest:
    seed: int
    converter: str
    sources: list[SourceEntry]
    options: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    def source(self, name: str) -> SourceEntry | None:
        return next((s for s in self.sources if s.name == name), None)

    def to_json(self) -> str:
        obj = asdict(self)
        keys = (
            "samples",
            "rejected",
            "images",
            "videos",
            "frames",
            "text_chars",
            "media_bytes",
            "epoch_samples",
        )
        obj["totals"] = {k: sum(getattr(s, k) for s in self.sources) for k in keys}
        obj["totals"]["shards"] = sum(len(s.shards) for s in self.sources)
        return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> Manifest:
        try:
            obj = json.loads(text)
            if obj.get("format") != FORMAT or obj.get("version") != VERSION:
                raise ValueError(
                    f"format {obj.get('format')!r} version {obj.get('version')!r}, "
                    f"expected {FORMAT!r} version {VERSION}"
                )
            obj.pop("totals", None)
            sources = [
                SourceEntry(**{**s, "shards": [ShardEntry(**sh) for sh in s["shards"]]})
                for s in obj.pop("sources")
            ]
            for s in sources:
                if s.samples != sum(sh.samples for sh in s.shards):
                    raise ValueError(
                        f"source {s.path} says {s.samples} samples but its shards hold "
                        f"{sum(sh.samples for sh in s.shards)}"
                    )
            return cls(**obj, sources=sources)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{where} is not an mmloom manifest ({e}); re-run data_tools/shard.py") from None


def summary_table(manifest: Manifest, reused: list[str] = ()) -> str:  # type: ignore[assignment]
    """One row per source: valid, rejected, media, per-epoch count, sampling, rejection reasons."""
    rows = [("source", "valid", "rejected", "images", "videos", "MB", "per epoch", "sampling", "reasons")]
    for s in manifest.sources:
        reasons = ", ".join(f"{k}:{v}" for k, v in s.rejected_by_reason.items()) or "-"
        rows.append(
            (
                s.name + (" (reused)" if s.name in reused else ""),
                str(s.samples),
                str(s.rejected),
                str(s.images),
                str(s.videos),
                f"{s.media_bytes / 1e6:.1f}",
                str(s.epoch_samples),
                s.sampling,
                reasons,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i in (0, 7, 8) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def load_manifest(shards_dir: str | Path) -> Manifest:
    path = Path(shards_dir) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found; create it with `python data_tools/shard.py data.txt --out {shards_dir}`"
        ) from None
    return Manifest.from_json(text, str(path))


def write_atomic(path: Path, text: str) -> None:
    """Write a file under a temporary name and rename it, so readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
