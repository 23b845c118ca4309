"""Canonical sample -> token ids, labels and media tensors, through the model's own processor.

The conversation is rendered with the processor's chat template, once per assistant turn: the
text before turn a with `add_generation_prompt=True` (exactly what inference sees) and the text
through turn a. The full text is cut at those boundaries into prompt and answer segments; each
segment is tokenized by the processor together with the images it contains, so every image is
processed once and expands exactly as at inference. Labels cover the answer segments up to and
including their end-of-turn token (a trailing newline after it is not trained on).

    rendered = render_sample(adapter, sample, members, max_tokens=8192, overlong="trim")
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageOps

from data_tools.frames import stored_clip
from data_tools.sample import ImagePart, Sample, TextPart, VideoPart
from data_tools.video import VideoPolicy, decode_video
from trainer.models.rendering import IGNORE

if TYPE_CHECKING:
    from trainer.models.rendering import Rendering


class RenderError(Exception):
    """A sample that cannot be rendered: `reason` is the skip counter it is counted under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Rendered:
    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, IGNORE outside answers
    position_ids: torch.Tensor  # [L], or [3, L] for 3-D rope families; restart at 0
    media: dict[str, torch.Tensor] = field(default_factory=dict)
    source: int = -1
    key: str = ""
    occurrence: int = -1
    id: str = ""  # the sample's id in its input file (its key if it had none)
    trimmed: bool = False  # later turns were cut to fit max_tokens

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def targets(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass
class _Segment:
    start: int
    end: int
    answer: bool
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)


def to_messages(sample: Sample, frames: list[int] | None = None) -> list[dict[str, Any]]:
    """Canonical sample -> Hugging Face chat messages with typed content parts. With `frames` (one
    count per video, in order), each video becomes that many images: its sampled frames, for
    families that take no video input."""
    frames = list(frames) if frames is not None else None
    messages = []
    if sample.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": sample.system}]})
    for turn in sample.turns:
        content = []
        for part in turn.parts:
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                content.append({"type": "image"})
            elif frames is not None:
                content.extend({"type": "image"} for _ in range(frames.pop(0)))
            else:
                content.append({"type": "video"})
        messages.append({"role": turn.role, "content": content})
    # Turns after the last answer carry nothing to learn.
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages


def decode_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    return ImageOps.exif_transpose(img).convert("RGB")


def render_sample(
    adapter: Rendering,
    sample: Sample,
    members: dict[str, bytes],
    max_tokens: int | None = None,
    overlong: str = "trim",
    video: VideoPolicy | None = None,
) -> Rendered:
    """Render one canonical sample; raises RenderError (a counted skip) when it cannot be used.
    Videos are sampled by `video` (default VideoPolicy()) and reach the model as videos, or as their
    frames for families that declare video = "frames"."""
    if not any(t.role == "assistant" for t in sample.turns):
        raise RenderError("no_answer", f"sample {sample.key} has no assistant turn")
    media = [p for t in sample.turns for p in t.parts if not isinstance(p, TextPart)]
    images, videos, frames = [], [], []
    for part in media:
        needed = part.frame_members if isinstance(part, VideoPart) and part.frame_members else [part.member]
        missing = [m for m in needed if m not in members]
        if missing:
            raise RenderError("missing_member", f"sample {sample.key} lacks member {missing[0]}")
        if isinstance(part, VideoPart):
            if not adapter.video:
                raise RenderError("video_unsupported", f"{adapter.family} takes no video input")
            try:
                if part.frame_members:  # frames extracted at conversion: their indices, not data.video's
                    clip = stored_clip(part, members, (video or VideoPolicy()).max_pixels)
                else:
                    clip = decode_video(members[part.member], video or VideoPolicy(), part.num_frames)
            except ValueError as e:
                raise RenderError("bad_video", f"sample {sample.key} {part.member}: {e}") from None
            if adapter.video == "frames":
                images.extend(Image.fromarray(f) for f in clip.frames)
                frames.append(len(clip.frames))
            else:
                videos.append(adapter.video_input(clip))
        else:
            try:
                images.append(decode_image(members[part.member]))
            except Exception as e:  # noqa: BLE001 - a bad image is a counted skip, never a crash
                raise RenderError("bad_image", f"sample {sample.key} {part.member}: {e!r}") from None

    messages = to_messages(sample, frames if adapter.video == "frames" else None)
    segments, text = _segments(adapter, messages)
    _assign_media(adapter, segments, text, images, videos, sample.key)
    if not _splits_cleanly(adapter, text, segments):
        return _render_whole(
            adapter, sample, members, text, segments, images, videos, max_tokens, overlong, video
        )
    ids, labels, seg_media, ends = [], [], [], []
    for seg in segments:
        out = adapter.process(
            text[seg.start : seg.end], seg.images, seg.videos, first=seg.start == 0, sample_images=len(images)
        )
        seg_ids = out["input_ids"][0].to(torch.int64)
        if seg.answer and not any(t in adapter.end_of_turn_ids for t in seg_ids.tolist()):
            # Templates that close answers with no end-of-turn token (llava-hf's) would never teach
            # the model to stop: end the answer with EOS, as the original training format does.
            seg_ids = torch.cat([seg_ids, torch.tensor([adapter.tokenizer.eos_token_id])])
        ids.append(seg_ids)
        labels.append(_answer_labels(adapter, seg_ids) if seg.answer else torch.full_like(seg_ids, IGNORE))
        seg_media.append(adapter.media_of(out))
        ends.append((sum(len(x) for x in ids), seg.answer))

    keep = len(segments)
    total = ends[-1][0]
    trimmed = False
    if max_tokens is not None and total > max_tokens:
        # Cut after the last answer that still fits: a turn boundary, never inside a media block.
        fits = [i + 1 for i, (end, answer) in enumerate(ends) if answer and end <= max_tokens]
        if overlong == "drop" or not fits:
            raise RenderError("too_long", f"sample {sample.key} has {total} tokens > max_tokens {max_tokens}")
        keep, trimmed = fits[-1], True
        if sum(len(seg.images) for seg in segments[:keep]) < len(images):
            # Fewer images can change how the kept ones are shown (LLaVA-OneVision: a lone image gets
            # AnyRes tiles): render the shorter sample anew, as inference would see it.
            answers = [i for i, t in enumerate(sample.turns) if t.role == "assistant"]
            last = answers[sum(s.answer for s in segments[:keep]) - 1]
            shorter = dataclasses.replace(sample, turns=sample.turns[: last + 1])
            rendered = render_sample(adapter, shorter, members, max_tokens, overlong, video)
            rendered.trimmed = True
            return rendered
    input_ids = torch.cat(ids[:keep])
    sample_media = adapter.collate_media(seg_media[:keep])
    return Rendered(
        input_ids=input_ids,
        labels=torch.cat(labels[:keep]),
        position_ids=adapter.position_ids(input_ids, sample_media),
        media=sample_media,
        key=sample.key,
        trimmed=trimmed,
    )


def _splits_cleanly(adapter: Rendering, text: str, segments: list[_Segment]) -> bool:
    """True when tokenizing the segments one by one gives the tokens of the whole text (media
    placeholders are single special tokens, so text alone decides). SentencePiece-style tokenizers
    add a word-start marker at the start of every call and fail this for later turns."""
    tok, bos = adapter.tokenizer, adapter.tokenizer.bos_token

    def encode(piece: str, first: bool) -> list[int]:
        return tok(piece, add_special_tokens=first and not (bos is not None and piece.startswith(bos)))[
            "input_ids"
        ]

    parts = [t for seg in segments for t in encode(text[seg.start : seg.end], seg.start == 0)]
    return parts == encode(text, True)


def _render_whole(
    adapter: Rendering,
    sample: Sample,
    members: dict[str, bytes],
    text: str,
    segments: list[_Segment],
    images: list,
    videos: list,
    max_tokens: int | None,
    overlong: str,
    video: VideoPolicy | None = None,
) -> Rendered:
    """The exact, slower path: the whole conversation tokenized at once (as inference does), with
    label spans found by tokenizing the text up to each turn boundary."""

    def upto(end: int) -> torch.Tensor:
        n_img = sum(len(s.images) for s in segments if s.end <= end)
        n_vid = sum(len(s.videos) for s in segments if s.end <= end)
        return adapter.process(
            text[:end], images[:n_img], videos[:n_vid], first=True, sample_images=len(images)
        )["input_ids"][0]

    full = adapter.process(text, images, videos, first=True, sample_images=len(images))
    ids = full["input_ids"][0].to(torch.int64)
    pieces, labels, pos, answer_ends = [], [], 0, []
    for seg in segments:
        if not seg.answer:
            continue
        start, end = len(upto(seg.start)), len(upto(seg.end))
        if not torch.equal(ids[:end], upto(seg.end).to(torch.int64)):
            raise RenderError(
                "tokenization_not_prefix",
                f"sample {sample.key}: the tokens of the conversation so far are not a prefix "
                f"of the whole conversation's",
            )
        answer = ids[start:end]
        if not any(t in adapter.end_of_turn_ids for t in answer.tolist()):
            answer = torch.cat([answer, torch.tensor([adapter.tokenizer.eos_token_id])])
        pieces += [ids[pos:start], answer]
        labels += [torch.full((start - pos,), IGNORE, dtype=torch.int64), _answer_labels(adapter, answer)]
        pos = end
        answer_ends.append(sum(len(p) for p in pieces))
    input_ids = torch.cat(pieces + [ids[pos:]])
    label = torch.cat(labels + [torch.full((len(ids) - pos,), IGNORE, dtype=torch.int64)])
    if max_tokens is not None and len(input_ids) > max_tokens:
        fits = [i for i, end in enumerate(answer_ends) if end <= max_tokens]
        if overlong == "drop" or not fits:
            raise RenderError(
                "too_long", f"sample {sample.key} has {len(input_ids)} tokens > max_tokens {max_tokens}"
            )
        answers = [i for i, t in enumerate(sample.turns) if t.role == "assistant"]
        shorter = dataclasses.replace(sample, turns=sample.turns[: answers[fits[-1]] + 1])
        # With fewer images the rest can take more tokens (LLaVA-OneVision): the limit applies again.
        rendered = render_sample(adapter, shorter, members, max_tokens, overlong, video)
        rendered.trimmed = True
        return rendered
    media = adapter.media_of(full)
    return Rendered(
        input_ids=input_ids,
        labels=label,
        position_ids=adapter.position_ids(input_ids, media),
        media=media,
        key=sample.key,
    )


def _segments(adapter: Rendering, messages: list[dict]) -> tuple[list[_Segment], str]:
    full = adapter.chat_text(messages, add_generation_prompt=False)
    cuts: list[tuple[int, int]] = []
    for a, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = adapter.chat_text(messages[:a], add_generation_prompt=True)
        through = adapter.chat_text(messages[: a + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(prompt)):
            raise RenderError(
                "template_not_prefix_consistent",
                f"the chat template renders turn {a} differently once later turns follow; "
                f"mmloom needs prefix-consistent templates to place labels",
            )
        cuts.append((len(prompt), len(through)))
    segments, pos = [], 0
    for start, end in cuts:
        if start > pos:
            segments.append(_Segment(pos, start, answer=False))
        if end > start:
            segments.append(_Segment(start, end, answer=True))
        pos = max(pos, end)
    return segments, full


def _assign_media(
    adapter: Rendering, segments: list[_Segment], text: str, images: list, videos: list, key: str
) -> None:
    queues = {"image": list(images), "video": list(videos)}
    for seg in segments:
        piece = text[seg.start : seg.end]
        for kind, token in (("image", adapter.image_token), ("video", adapter.video_token)):
            n = piece.count(token) if token else 0
            if n > len(queues[kind]):
                raise RenderError(
                    "media_mismatch",
                    f"sample {key}: the template placed more {kind} tokens than the sample has {kind}s",
                )
            target = seg.images if kind == "image" else seg.videos
            target.extend(queues[kind][:n])
            del queues[kind][:n]
    for kind, left in queues.items():
        if left:
            raise RenderError(
                "media_mismatch",
                f"sample {key}: {len(left)} {kind}(s) not placed by the chat template "
                f"(does this model support {kind}s?)",
            )


def _answer_labels(adapter: Rendering, seg_ids: torch.Tensor) -> torch.Tensor:
    labels = seg_ids.clone()
    eot = [i for i, t in enumerate(seg_ids.tolist()) if t in adapter.end_of_turn_ids]
    if eot:
        labels[eot[-1] + 1 :] = IGNORE  # e.g. the "\n" after <|im_end|>
    media = torch.tensor(sorted(adapter.media_token_ids), dtype=seg_ids.dtype)
    labels[torch.isin(seg_ids, media)] = IGNORE  # an image inside an answer is input, not output
    return labels
