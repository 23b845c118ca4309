"""Length-bucketed packing: rendered samples -> sequences of at most `max_tokens` tokens.

The packer holds a pool of rendered samples. Once the pool is full it builds one pack: the
longest sample first, then, scanning the rest from longest to shortest, every sample that still
fits (best-fit decreasing for one bin). Long samples leave early and short ones fill the gaps,
which keeps the token slots nearly full without ever cutting a sample.

A packed micro-batch concatenates the samples: positions restart at 0 for each sample, the first
label of each sample is ignored (it would be predicted from the previous sample), and media
tensors are concatenated in order. With no attention mask, transformers builds the
block-diagonal causal mask from the restarting positions, so no token attends across samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from trainer.data.render import IGNORE, Rendered

if TYPE_CHECKING:
    from trainer.models.batching import Batching


class Packer:
    """`reserve`: tokens a pack without media needs for the grey image collate appends to it."""

    def __init__(
        self,
        max_tokens: int,
        buffer: int,
        reserve: int = 0,
        compatible: Callable[[list[Rendered], Rendered], bool] | None = None,
    ) -> None:
        self.max_tokens, self.buffer, self.reserve = max_tokens, buffer, reserve
        self.compatible = compatible  # adapter.packs_with: can a sample join the samples chosen so far
        self.pool: list[Rendered] = []

    def add(self, sample: Rendered) -> Iterator[list[Rendered]]:
        assert sample.length <= self.max_tokens - (0 if sample.media else self.reserve), (
            "render_sample trims or drops over-long samples"
        )
        self.pool.append(sample)
        while len(self.pool) >= self.buffer:
            yield self.take()

    def flush(self) -> Iterator[list[Rendered]]:
        while self.pool:
            yield self.take()

    def take(self) -> list[Rendered]:
        order = sorted(range(len(self.pool)), key=lambda i: (-self.pool[i].length, i))
        chosen, used, has_media = [], 0, False
        for i in order:
            sample = self.pool[i]
            media = has_media or bool(sample.media)
            if used + sample.length <= self.max_tokens - (0 if media else self.reserve) and (
                self.compatible is None or self.compatible([self.pool[j] for j in chosen], sample)
            ):
                chosen.append(i)
                used, has_media = used + sample.length, media
                if used == self.max_tokens:
                    break
        taken = set(chosen)
        pack = [self.pool[i] for i in chosen]
        self.pool = [s for i, s in enumerate(self.pool) if i not in taken]
        return pack


# The sample boundaries collate adds to a pack's model inputs (trainer/attention.py reads them).
PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "mmloom_segments")


@dataclass
class Pack:
    """One packed micro-batch: model inputs plus what the loop and the metrics need to know."""

    inputs: dict[str, Any]  # tensors, plus the packed-sequence kwargs (ints, a tuple)
    tokens: int  # real tokens (no padding in a pack)
    targets: int  # tokens with a label
    sources: list[int]  # source index of each sample
    keys: list[tuple[int, str, int]]  # (source, key, occurrence) of each sample
    ids: list[str]  # each sample's id in its input file
    lengths: list[int]
    skips: dict[str, int] = field(default_factory=dict)  # {"reason:source": n} since the previous pack
    trimmed: int = 0
    dummy: bool = False  # a grey image block was appended (no real media in the pack)

    @property
    def length(self) -> int:
        """Tokens in the sequence the model sees, the grey image block included."""
        return int(self.inputs["input_ids"].shape[-1])

    @property
    def empty(self) -> bool:
        """A pack with no samples: a rank that ran dry, or one carrying only skip counts."""
        return not self.sources


def collate(adapter: Batching, samples: list[Rendered]) -> Pack:
    labels = []
    for s in samples:
        lab = s.labels.clone()
        lab[0] = IGNORE
        labels.append(lab)
    ids = [s.input_ids for s in samples]
    positions = [s.position_ids for s in samples]
    media = adapter.collate_media([s.media for s in samples if s.media])
    tokens = sum(len(x) for x in ids)
    dummy = not adapter.has_vision_inputs(media)
    if dummy:
        # Every micro-batch runs the vision tower, so that under FSDP every rank issues the same
        # collectives in the same order even when its pack is text-only: one small grey image goes
        # at the end as a sample of its own (positions restart, no labels, nothing attends to it).
        dummy_ids, dummy_media, dummy_pos = adapter.dummy_image
        ids.append(dummy_ids)
        positions.append(dummy_pos)
        labels.append(torch.full_like(dummy_ids, IGNORE))
        media = adapter.collate_media([dummy_media])
    input_ids, label = torch.cat(ids), torch.cat(labels)
    inputs = adapter.model_inputs(input_ids, label, torch.cat(positions, dim=-1), media)
    # The sample boundaries, once per pack, as transformers' packed-sequence kwargs (trainer/attention.py).
    # Not for a model that packs no samples together (packs_isolated): its layers may refuse them
    # (transformers' Gated DeltaNet without its kernel), and one sample needs none (the grey image
    # after it sees it, but nothing after that image has a label).
    segments = tuple(len(x) for x in ids)
    cu = torch.tensor([0, *itertools.accumulate(segments)], dtype=torch.int32)
    if adapter.packs_isolated:
        inputs.update(
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=max(segments),
            max_length_k=max(segments),
            mmloom_segments=segments,
        )
    return Pack(
        inputs=inputs,
        tokens=tokens,
        targets=int((label != IGNORE).sum()),
        sources=[s.source for s in samples],
        keys=[(s.source, s.key, s.occurrence) for s in samples],
        ids=[s.id for s in samples],
        lengths=[s.length for s in samples],
        trimmed=sum(s.trimmed for s in samples),
        dummy=dummy,
    )


def empty_pack(adapter: Batching, skips: dict[str, int] | None = None) -> Pack:
    """A zero-weight micro-batch (just the dummy image, no label): ranks that ran dry step with it."""
    pack = collate(adapter, [])
    pack.skips = dict(skips or {})
    return pack
