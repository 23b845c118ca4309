"""What rendering a conversation needs (trainer/data/render.py): the processor's tokens and chat
template, one segment tokenized as inference tokenizes it, positions, video frames."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch

from trainer.models.checkpoint import Checkpoint

IGNORE = -100  # the label of a position the loss skips (transformers' ignore_index)


@dataclass
class VideoFrames:
    """One video as a video-native family's processor gets it: the frames data_tools.video already
    sampled, with the metadata transformers' VideoMetadata holds (the video's fps and frame count,
    which frames these are), so the processor neither samples again nor guesses the frame rate:
    Qwen2.5-VL's temporal rope spacing and Qwen3-VL's timestamps come from the real sampled frames."""

    frames: Any  # uint8 [T, H, W, 3]
    metadata: dict[str, Any]

    @classmethod
    def of(cls, clip: Any) -> VideoFrames:
        """From a data_tools.video.Clip. A clip of unknown frame rate counts as one sampled frame a
        second (Clip.sample_fps), so VideoMetadata.sampled_fps equals clip.sample_fps either way."""
        indices = [int(i) for i in clip.indices]
        total = max(int(clip.total_frames), max(indices) + 1)
        fps = float(clip.fps) if clip.fps and clip.fps > 0 else total / len(indices)
        height, width = clip.frames.shape[1:3]
        return cls(
            frames=clip.frames,
            metadata={
                "total_num_frames": total,
                "fps": fps,
                "frames_indices": indices,
                "duration": total / fps,
                "height": height,
                "width": width,
            },
        )


class Rendering(Checkpoint):
    video: ClassVar[str] = "frames"  # "native" (the model takes videos), "frames" (the sampled frames
    # become images), "" (videos are skipped, counted)
    media_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "image_sizes", "pixel_values_videos")
    end_of_turn_tokens: ClassVar[tuple[str, ...]] = ()  # besides the tokenizer's eos token
    media_token_pattern: ClassVar[str] = ""  # added tokens that wrap media, besides the processor's
    process_kwargs: ClassVar[dict[str, Any]] = {}  # passed to the processor by every `process` call

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @cached_property
    def image_token(self) -> str | None:
        return getattr(self.processor, "image_token", None)

    @cached_property
    def video_token(self) -> str | None:
        return getattr(self.processor, "video_token", None)

    @cached_property
    def end_of_turn_ids(self) -> set[int]:
        tok = self.tokenizer
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        for t in self.end_of_turn_tokens:
            ids.add(tok.convert_tokens_to_ids(t))
        return ids

    @cached_property
    def media_token_ids(self) -> set[int]:
        """Tokens that stand for media or wrap them (<image>, <|vision_start|>, <row_1_col_1>, ...):
        never trained on, even when an image sits inside an answer."""
        tok, proc = self.tokenizer, self.processor
        names = {v for k, v in vars(proc).items() if k.endswith("_token") and isinstance(v, str)}
        if self.media_token_pattern:
            names |= {t for t in tok.get_added_vocab() if re.fullmatch(self.media_token_pattern, t)}
        ids = {tok.convert_tokens_to_ids(t) for t in names if t in tok.get_added_vocab()}
        return ids - self.end_of_turn_ids - {tok.bos_token_id, tok.pad_token_id}

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # --- rendering -----------------------------------------------------------------------

    def chat_text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def process(self, text: str, images: list, videos: list, first: bool, sample_images: int = 0) -> Any:
        """Tokenize one segment with its media, as the processor does at inference. `sample_images`:
        the images of the whole sample (LLaVA-OneVision shows an image differently when it has company)."""
        bos = self.tokenizer.bos_token
        # Like processor.apply_chat_template: special tokens only at the very start, and not
        # when the template already wrote the BOS token itself.
        special = first and not (bos is not None and text.startswith(bos))
        if (
            not images
            and not videos
            and not any(t and t in text for t in (self.image_token, self.video_token))
        ):
            # Nothing for the processor to expand: its tokenizer alone, at a third of the cost.
            return self.tokenizer([text], return_tensors="pt", add_special_tokens=special)
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": special}
        kwargs.update(self.process_kwargs)
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = [v.frames if isinstance(v, VideoFrames) else v for v in videos]
            metadata = [v.metadata for v in videos if isinstance(v, VideoFrames)]
            if metadata:  # frames already sampled by data_tools.video: none sampled again
                kwargs.update(video_metadata=metadata, do_sample_frames=False)
        return self.processor(**kwargs)

    def media_of(self, out: Any) -> dict[str, torch.Tensor]:
        return {k: out[k] for k in self.media_keys if k in out and out[k] is not None}

    def position_ids(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.arange(input_ids.shape[0], dtype=torch.int64)

    def video_input(self, clip: Any) -> Any:
        """What `process` gets for one decoded video (a data_tools.video.Clip) of a family with
        video = "native": its frames and their metadata."""
        return VideoFrames.of(clip)
