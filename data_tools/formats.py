"""Input formats -> one draft of a canonical sample (media not read yet).

Accepted, as records of a JSON array or a JSONL file:

- LLaVA / ShareGPT: `conversations: [{from: human|gpt|system, value}]`, `<image>` / `<video>`
  placeholders, `image` / `video` as a string or a list.
- InternLM-XComposer: the same with `from: user|assistant` and `<ImageHere>`.
- MiniCPM-V: `conversations: [{role, content}]`, `image` as a path or a dict
  `{"<image_00>": path, ...}` whose keys are the placeholders.
- lmms-finetune extras: `system_prompt`, `video`, `num_frames` (int, or one per video).
- OpenAI / Hugging Face `messages: [{role, content}]`, content a string (placeholders resolved
  against top-level `images` / `videos`) or typed parts: `{"type": "text", "text"}`,
  `{"type": "image", "image"|"path"|"url"}`, `{"type": "image_url", "image_url": {"url"}}`,
  `{"type": "video", ...}`; a media part without a path takes the next entry of `images`/`videos`.
  `data:` URIs are decoded inline.

A relative media path resolves against the first of the media roots that holds it: lmms-finetune
keeps images and videos in separate folders (`image_folder`, `video_folder`), and one sample may
name both.

Where placeholders are used, their count must equal the number of media; where none is used,
the media go in front of the first user turn. A newline right next to a placeholder is the
LLaVA `<image>\\n` convention and is dropped; text is otherwise kept as written.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_tools.sample import ROLES, Rejected

IMAGE_PLACEHOLDERS = ("<image>", "<ImageHere>")
VIDEO_PLACEHOLDERS = ("<video>",)
_ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
assert set(_ROLE_ALIASES.values()) == set(ROLES)


@dataclass(kw_only=True)
class MediaRef:
    kind: Literal["image", "video"]
    origin: str  # as written in the input (a data: URI is shortened)
    path: Path | None = None  # resolved file, or None for inline bytes
    data: bytes | None = None
    num_frames: int | None = None
    roots: tuple[Path, ...] = ()  # the folders a relative path was looked up in, in order


@dataclass(kw_only=True)
class Draft:
    """A converted record whose media are still references: parts are text or MediaRef."""

    id: str | None
    system: str | None
    turns: list[tuple[str, list[str | MediaRef]]] = field(default_factory=list)

    @property
    def media(self) -> list[MediaRef]:
        return [p for _, parts in self.turns for p in parts if isinstance(p, MediaRef)]


def parse_record(record: Any, *, media_roots: Sequence[Path]) -> Draft:
    """Convert one input record; raises Rejected with a reason a person can act on."""
    assert media_roots, "at least one media root: the JSON file's folder by default"
    roots = tuple(media_roots)
    if not isinstance(record, dict):
        raise Rejected("bad_record", f"the record is a JSON {type(record).__name__}, expected an object")
    raw_id = record.get("id")
    sample_id = None if raw_id is None else str(raw_id)
    if "messages" in record:
        draft = _from_messages(record, sample_id, roots)
    elif "conversations" in record:
        draft = _from_conversations(record, sample_id, roots)
    else:
        raise Rejected(
            "unknown_format",
            f"no `conversations` or `messages` list (keys: {sorted(record)[:8]}); "
            "see docs/data.md's 'Input formats'",
        )
    _check_turns(draft)
    return draft


# --- the two record shapes -----------------------------------------------------------------


def _from_conversations(record: dict, sample_id: str | None, roots: tuple[Path, ...]) -> Draft:
    convs = _nonempty_list(record["conversations"], "conversations")
    images_field = record.get("image", record.get("images"))
    videos = _media_list(record.get("video", record.get("videos")), "video", roots)
    _apply_num_frames(videos, record.get("num_frames"))
    system = _optional_text(record.get("system_prompt", record.get("system")), "system_prompt")
    if not isinstance(images_field, dict):
        images = _media_list(images_field, "image", roots)

    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise Rejected(
                "bad_record", f"conversations[{i}] is a JSON {type(turn).__name__}, expected an object"
            )
        role = turn.get("from", turn.get("role"))
        key = "value" if "value" in turn else "content"
        turns.append((_role(role, i), _text(turn.get(key), f"conversations[{i}].{key}")))

    if isinstance(images_field, dict):
        # MiniCPM-V: {"<image_00>": path}; the keys are this sample's placeholders.
        tagged = [((str(tag),), _media_list(path, "image", roots)) for tag, path in images_field.items()]
        return _place(
            system, sample_id, turns, [*tagged, (VIDEO_PLACEHOLDERS, videos)], all_or_none=len(tagged)
        )
    return _place(system, sample_id, turns, [(IMAGE_PLACEHOLDERS, images), (VIDEO_PLACEHOLDERS, videos)])


def _from_messages(record: dict, sample_id: str | None, roots: tuple[Path, ...]) -> Draft:
    messages = _nonempty_list(record["messages"], "messages")
    images = _media_list(record.get("images", record.get("image")), "image", roots)
    videos = _media_list(record.get("videos", record.get("video")), "video", roots)
    _apply_num_frames(videos, record.get("num_frames"))
    system = _optional_text(record.get("system"), "system")
    pools = {"image": list(images), "video": list(videos)}

    typed: list[tuple[str, list[str | MediaRef]]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise Rejected("bad_record", f"messages[{i}] is a JSON {type(msg).__name__}, expected an object")
        role = _role(msg.get("role"), i)
        content = msg.get("content")
        if isinstance(content, list):
            typed.append(
                (
                    role,
                    [
                        _typed_part(p, f"messages[{i}].content[{j}]", roots, pools)
                        for j, p in enumerate(content)
                    ],
                )
            )
        else:
            typed.append((role, [_text(content, f"messages[{i}].content")]))

    if all(isinstance(p, str) for _, parts in typed for p in parts):
        # Plain-string contents: placeholders against the top-level lists (LLaMA-Factory style).
        turns = [(role, "".join(parts)) for role, parts in typed]  # type: ignore[arg-type]
        return _place(system, sample_id, turns, [(IMAGE_PLACEHOLDERS, images), (VIDEO_PLACEHOLDERS, videos)])
    for kind, left in pools.items():
        if left:
            raise Rejected(
                "media_count_mismatch",
                f'{len(left)} of the sample\'s `{kind}s` are not used by any `{{"type": "{kind}"}}` part; '
                f"add a part for each or remove the extra entries",
            )
    draft = Draft(id=sample_id, system=system)
    for role, parts in typed:
        draft.turns.append((role, [p for p in parts if not (isinstance(p, str) and not p)]))
    return _lift_system(draft)


def _typed_part(
    part: Any, where: str, roots: tuple[Path, ...], pools: dict[str, list[MediaRef]]
) -> str | MediaRef:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise Rejected("bad_record", f"{where} must be an object with a string `type`")
    kind = part["type"]
    if kind == "text":
        return _text(part.get("text"), f"{where}.text")
    if kind in ("image", "image_url", "video", "video_url"):
        media_kind = "image" if kind.startswith("image") else "video"
        value = part.get(kind)
        for key in ("path", "url", "file"):
            value = part.get(key) if value is None else value
        if isinstance(value, dict):
            value = value.get("url")
        if isinstance(value, list):
            raise Rejected(
                "bad_media_field", f"{where} names a list of files; give one {media_kind} per part"
            )
        if value is None:
            if not pools[media_kind]:
                raise Rejected(
                    "media_count_mismatch",
                    f"{where} is a {media_kind} part with no path and the sample's `{media_kind}s` list "
                    f"has no entry left for it; give the path in the part or add it to `{media_kind}s`",
                )
            ref = pools[media_kind].pop(0)
        else:
            [ref] = _media_list(value, media_kind, roots)
        if media_kind == "video" and part.get("num_frames") is not None:
            _apply_num_frames([ref], part["num_frames"])
        return ref
    raise Rejected("bad_record", f"{where} has unknown type {kind!r}; use text, image, image_url, video")


# --- placing media at their placeholders ---------------------------------------------------


def _place(
    system: str | None,
    sample_id: str | None,
    turns: list[tuple[str, str]],
    groups: list[tuple[tuple[str, ...], list[MediaRef]]],
    all_or_none: int = 0,
) -> Draft:
    """Split turn texts at placeholders. Each group's placeholders consume its refs in order;
    a group whose placeholders never appear puts its media in front of the first user turn.
    The first `all_or_none` groups are used all together or not at all (MiniCPM-V's keys)."""
    owner = {tag: g for g, (tags, _) in enumerate(groups) for tag in tags}
    pattern = re.compile("|".join(re.escape(t) for t in sorted(owner, key=len, reverse=True)))
    found = [0] * len(groups)
    for _, text in turns:
        for tag in pattern.findall(text):
            found[owner[tag]] += 1

    for (tags, refs), n in zip(groups, found):
        if n and n != len(refs):
            raise Rejected(
                "media_count_mismatch",
                f"{n} {'/'.join(tags)} placeholder(s) but {len(refs)} {_kind_of(tags)}(s) given; "
                f"use one placeholder per {_kind_of(tags)}, or none to put them in front",
            )
    tied = found[:all_or_none]
    if any(tied) and not all(tied):
        missing = next(tags[0] for (tags, _), n in zip(groups, tied) if not n)
        raise Rejected(
            "media_count_mismatch",
            f"placeholder {missing} of `image` is not in the text; use every key once, "
            f"or none at all to put the images in front",
        )

    queues = [list(refs) for _, refs in groups]
    draft = Draft(id=sample_id, system=system)
    for role, text in turns:
        parts: list[str | MediaRef] = []
        pieces, tags_found = pattern.split(text), pattern.findall(text)
        for k, piece in enumerate(pieces):
            if k > 0:
                piece = piece.removeprefix("\n")
            if k < len(tags_found):
                piece = piece.removesuffix("\n")
            if piece.strip():
                parts.append(piece)
            if k < len(tags_found):
                parts.append(queues[owner[tags_found[k]]].pop(0))
        draft.turns.append((role, parts))

    front = [ref for (_, refs), n in zip(groups, found) if not n for ref in refs]
    if front:
        first_user = next((i for i, (role, _) in enumerate(draft.turns) if role == "user"), None)
        if first_user is None:
            raise Rejected(
                "media_count_mismatch",
                "media given but there is no user turn to put them in; add a user turn",
            )
        role, parts = draft.turns[first_user]
        draft.turns[first_user] = (role, front + parts)
    return _lift_system(draft)


def _kind_of(tags: tuple[str, ...]) -> str:
    return "video" if tags[0] in VIDEO_PLACEHOLDERS else "image"


def _lift_system(draft: Draft) -> Draft:
    # A leading system turn is the system prompt, unless the record also gave one.
    if draft.turns and draft.turns[0][0] == "system" and draft.system is None:
        parts = draft.turns[0][1]
        if all(isinstance(p, str) for p in parts):
            draft.system = "".join(parts)  # type: ignore[arg-type]
            draft.turns = draft.turns[1:]
    return draft


_ANY_PLACEHOLDER = re.compile("|".join(re.escape(t) for t in (*IMAGE_PLACEHOLDERS, *VIDEO_PLACEHOLDERS)))


def _check_turns(draft: Draft) -> None:
    # A placeholder left in the text (typed parts, MiniCPM-V keys) would make the model's processor
    # count one more image than the sample has, and fail in training: reject it here.
    for role, parts in draft.turns:
        for p in parts:
            if isinstance(p, str) and (m := _ANY_PLACEHOLDER.search(p)):
                raise Rejected(
                    "media_count_mismatch",
                    f"the {role} text holds the placeholder {m.group()} but no media fills it; "
                    f"remove it or give the media as a part",
                )
    if not draft.turns:
        raise Rejected("empty_conversation", "the conversation has no turns besides the system prompt")
    answers = [(i, parts) for i, (role, parts) in enumerate(draft.turns) if role == "assistant"]
    if not answers:
        raise Rejected(
            "no_assistant_turn", "no assistant (gpt) turn, so there is nothing to train on; add the answer"
        )
    for i, parts in answers:
        if not any(isinstance(p, str) and p.strip() for p in parts):
            raise Rejected(
                "empty_answer", f"assistant turn {i} has no text; give the answer or drop the turn"
            )


# --- small field readers -------------------------------------------------------------------


def _nonempty_list(value: Any, name: str) -> list:
    if not isinstance(value, list):
        raise Rejected("bad_record", f"`{name}` is a JSON {type(value).__name__}, expected a list of turns")
    if not value:
        raise Rejected(
            "empty_conversation", f"`{name}` is empty; a sample needs at least a question and an answer"
        )
    return value


def _role(role: Any, i: int) -> str:
    if isinstance(role, str) and role.lower() in _ROLE_ALIASES:
        return _ROLE_ALIASES[role.lower()]
    raise Rejected("unknown_role", f"turn {i} has role {role!r}; use human/user, gpt/assistant or system")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise Rejected("bad_text", f"{where} is {_describe(value)}, expected a string")
    return value


def _optional_text(value: Any, where: str) -> str | None:
    return None if value is None else _text(value, where)


def _describe(value: Any) -> str:
    return "missing" if value is None else f"a JSON {type(value).__name__}"


def _media_list(value: Any, kind: str, roots: tuple[Path, ...]) -> list[MediaRef]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    refs = []
    for v in values:
        if not isinstance(v, str) or not v.strip():
            raise Rejected("bad_media_field", f"`{kind}` entry {v!r} is not a file path; give a path string")
        refs.append(_media_ref(v, kind, roots))
    return refs


def _media_ref(value: str, kind: str, roots: tuple[Path, ...]) -> MediaRef:
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if not header.endswith(";base64"):
            raise Rejected(
                "bad_media_field", f"{kind} data URI {header!r} is not base64; encode it as base64"
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise Rejected("bad_media_field", f"{kind} data URI {header!r} has invalid base64") from None
        return MediaRef(kind=kind, origin=f"{header},...", data=data)  # type: ignore[arg-type]
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value) and not value.startswith("file://"):
        raise Rejected(
            "remote_media",
            f"{kind} {value!r} is a URL; download it and give a local path (nothing is fetched)",
        )
    path = Path(value.removeprefix("file://"))
    if path.is_absolute():
        return MediaRef(kind=kind, origin=value, path=path)  # type: ignore[arg-type]
    return MediaRef(kind=kind, origin=value, path=_resolve(path, roots), roots=roots)  # type: ignore[arg-type]


def _resolve(path: Path, roots: tuple[Path, ...]) -> Path:
    """The first root's file that exists, else the first root's (read_media then names every root)."""
    if len(roots) > 1:  # one root needs no look-up: a stat per media file counts on network disks
        for root in roots:
            if (root / path).exists():
                return root / path
    return roots[0] / path


def _apply_num_frames(videos: list[MediaRef], value: Any) -> None:
    if value is None:
        return
    values = value if isinstance(value, list) else [value] * len(videos)
    if len(values) != len(videos) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
    ):
        raise Rejected(
            "bad_num_frames", f"num_frames {value!r} must be a positive integer, or a list with one per video"
        )
    for ref, n in zip(videos, values):
        ref.num_frames = n
