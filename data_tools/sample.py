"""The canonical sample: what every input format becomes, stored as `<key>.json` in a shard.

A sample is an id, its source, an optional system prompt and a list of turns. Each turn has a
role and a list of parts; a part is text, an image or a video. Media parts name a member of the
same sample in the tar (`<key>.img0.jpg` is named `img0.jpg`) and carry what is needed to
estimate token counts without decoding: image width/height after EXIF orientation, video
size, frame count, fps and duration. A video converted with `shard.py --video-frames` holds its
sampled frames as image members instead (`frame_members`, see data_tools/frames.py).

    sample = Sample.from_json(tar_member_bytes)
    for turn in sample.turns: ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

SCHEMA_VERSION = 1
ROLES = ("system", "user", "assistant")

Role = Literal["system", "user", "assistant"]


@dataclass(kw_only=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(kw_only=True)
class ImagePart:
    member: str  # tar member of the same key, e.g. "img0.jpg"
    width: int  # after EXIF orientation
    height: int
    format: str  # detected from the bytes (PIL name, lower-case), not the file name
    bytes: int
    origin: str | None = None  # where it came from (path as written in the input), for people
    type: Literal["image"] = "image"


@dataclass(kw_only=True)
class VideoPart:
    member: str  # e.g. "vid0.mp4"
    width: int
    height: int
    frames: int  # video packets in the stream (one per frame for common codecs)
    fps: float
    duration: float  # seconds
    format: str
    bytes: int
    num_frames: int | None = None  # frames to sample for training, when the input asked (lmms-finetune)
    origin: str | None = None
    # Set when the converter stored the sampled frames instead of the video (shard.py --video-frames,
    # data_tools/frames.py); `member` is then the first frame, the fields above stay the video's.
    frame_members: list[str] | None = None  # image members, one per sampled frame, in order
    frame_indices: list[int] | None = None  # which frames of the video they are
    frame_timestamps: list[float] | None = None  # seconds: index / source_fps
    source_fps: float | None = None  # frame rate and frame count as the decoder read the
    source_frames: int | None = None  # video (what the indices and timestamps refer to)
    type: Literal["video"] = "video"


class Rejected(Exception):
    """A sample that cannot be used. `code` groups rejections in summaries; the message says
    what is wrong and what to do, and goes to rejected.jsonl."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


Part = TextPart | ImagePart | VideoPart
_PART_TYPES: dict[str, type] = {"text": TextPart, "image": ImagePart, "video": VideoPart}


@dataclass(kw_only=True)
class Turn:
    role: Role
    parts: list[Part]


@dataclass(kw_only=True)
class Sample:
    key: str  # tar key: zero-padded position in the source file
    source: str  # source name (the shard directory)
    index: int  # position of the record in its input file
    id: str | None = None  # the input's own id, if it had one
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)
    schema: int = SCHEMA_VERSION

    @property
    def media(self) -> list[ImagePart | VideoPart]:
        """Media parts in conversation order."""
        return [p for t in self.turns for p in t.parts if not isinstance(p, TextPart)]

    def to_json(self) -> bytes:
        """Deterministic UTF-8 JSON (same sample -> same bytes)."""
        # `default=vars` walks the dataclasses in field order, without asdict's deep copies.
        return json.dumps(self, default=vars, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str | dict[str, Any]) -> Sample:
        obj = json.loads(data) if isinstance(data, (bytes, str)) else data
        if obj.get("schema") != SCHEMA_VERSION:
            raise ValueError(
                f"sample {obj.get('key')!r} has schema {obj.get('schema')!r}, this mmloom reads "
                f"{SCHEMA_VERSION}; re-run data_tools/shard.py"
            )
        turns = [
            Turn(role=t["role"], parts=[_PART_TYPES[p["type"]](**p) for p in t["parts"]])
            for t in obj["turns"]
        ]
        return cls(**{**obj, "turns": turns})
