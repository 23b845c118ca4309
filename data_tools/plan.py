"""The mixing plan: which samples an epoch trains on, which (rank, worker) reads each, and in which order.

Everything here is a pure function of the manifest, the seed and the epoch, so every rank and worker
computes the same plan on its own, and a checkpoint only needs cursors into it.

- **Counts** (`sample_counts`): every source gets exactly its per-epoch count. Each valid sample occurs
  floor(target / valid) times, plus a fresh draw of target mod valid distinct samples each epoch.
- **Sequences** (`plan_epoch`): a source's occurrences form its sequence. Round r holds the samples that
  occur more than r times; each round visits the source's shards in an order drawn for that round, and each
  shard front to back. The copies of an up-sampled sample are therefore a round apart, never adjacent, and
  any contiguous run of a sequence reads its shards sequentially. Occurrence ids number the epoch source by
  source, each source in sequence order.
- **Slices** (`split`): the occurrences still to read are cut over P = ranks x workers slices. Every slice
  gets a contiguous part of every source's sequence in proportion to the source's size, and slice sizes
  differ by at most one. The sources' sequences are merged in proportion (the j-th of n at (j + 1/2) / n,
  Webster's apportionment) and the merged sequence is cut into P equal parts.
- **Order** (`slice_order`): a slice reads its sources in a uniformly random interleaving, as if the next
  sample came from source s with probability (s's samples left) / (samples left). At every moment of the
  epoch, on one GPU as on 512, each stream then carries every source in its epoch proportion.
- **Generations** (`Generation`): a checkpoint resumed on another number of ranks or workers starts a new
  generation of the epoch. Its occurrences are exactly the ones no rank had trained yet, those held in
  shuffle and packing buffers included, and they are split over the new slices as above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from data_tools.manifest import Manifest, ShardEntry


def _rng(seed: int, *words: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32, *words])


def sample_counts(manifest: Manifest, seed: int, epoch: int) -> list[np.ndarray]:
    """How often each valid sample of each source occurs in `epoch`: every sample
    floor(target/valid) times, plus a fresh draw of target mod valid distinct samples."""
    counts = []
    for i, source in enumerate(manifest.sources):
        n, target = source.samples, source.epoch_samples
        if n == 0:
            if target:
                raise ValueError(
                    f"source {source.path} has no valid samples but asks for {target} per "
                    f"epoch; fix its data or set its count to 0 in data.txt"
                )
            counts.append(np.zeros(0, dtype=np.int32))
            continue
        c = np.full(n, target // n, dtype=np.int32)
        extra = target % n
        if extra:
            c[_rng(seed, epoch, i, 0x5A3D).choice(n, size=extra, replace=False)] += 1
        counts.append(c)
    return counts


@dataclass(frozen=True)
class EpochPlan:
    """Every occurrence of one epoch. Occurrence k reads sample `pos[k]` (its ordinal inside the shard)
    of shard `shard[k]` (an index into `shards`); source s owns the ids `starts[s]` to `starts[s+1] - 1`,
    in the order of its sequence."""

    epoch: int
    shards: list[tuple[int, ShardEntry]]  # (source index, shard) for every shard of the manifest
    shard: np.ndarray  # int32, one per occurrence
    pos: np.ndarray  # int32
    starts: np.ndarray  # int64, sources + 1

    def __len__(self) -> int:
        return len(self.shard)

    @property
    def sources(self) -> int:
        return len(self.starts) - 1

    def source_of(self, occurrences: Any) -> np.ndarray:
        return np.searchsorted(self.starts, occurrences, side="right") - 1


def plan_epoch(manifest: Manifest, seed: int, epoch: int) -> EpochPlan:
    """Pure function (manifest, seed, epoch) -> the epoch's occurrences, each source in sequence order."""
    counts = sample_counts(manifest, seed, epoch)
    shards = [(i, sh) for i, s in enumerate(manifest.sources) for sh in s.shards]
    shard_ids, positions, starts = [], [], [0]
    g = 0
    for i, source in enumerate(manifest.sources):
        mine = range(g, g + len(source.shards))
        first = np.cumsum([0] + [sh.samples for sh in source.shards])
        g += len(source.shards)
        total = 0
        for r in range(int(counts[i].max(initial=0))):
            for k in _rng(seed, epoch, i, r, 0x5A4D).permutation(len(mine)):
                pos = np.flatnonzero(counts[i][first[k] : first[k + 1]] > r).astype(np.int32)
                shard_ids.append(np.full(len(pos), mine[k], dtype=np.int32))
                positions.append(pos)
                total += len(pos)
        starts.append(starts[-1] + total)
    empty = np.zeros(0, dtype=np.int32)
    return EpochPlan(
        epoch=epoch,
        shards=shards,
        shard=np.concatenate(shard_ids) if shard_ids else empty,
        pos=np.concatenate(positions) if positions else empty,
        starts=np.array(starts, dtype=np.int64),
    )


def split(sizes: Any, parts: int) -> np.ndarray:
    """[parts + 1, sources] cumulative cuts: slice p takes entries [cuts[p, s], cuts[p + 1, s]) of source
    s's sequence. Slices differ by at most one in size and hold every source in proportion."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    cuts = np.zeros((parts + 1, len(sizes)), dtype=np.int64)
    if total == 0:
        return cuts
    # Merge the sequences by fractional position (j + 1/2) / n; a stable sort of runs that are each
    # already sorted is a merge, and ties go to the lower source index.
    keys = np.concatenate([(np.arange(n) + 0.5) / n for n in sizes if n])
    label = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)[np.argsort(keys, kind="stable")]
    bounds = np.arange(parts + 1, dtype=np.int64) * total // parts
    for s in np.flatnonzero(sizes):
        cuts[:, s] = np.searchsorted(np.flatnonzero(label == s), bounds)
    return cuts


def read_order(ids: list[np.ndarray], order: np.ndarray) -> np.ndarray:
    """The occurrence ids of a slice in the order it reads them (`slice_ids`' two results)."""
    out = np.zeros(len(order), dtype=np.int64)
    for s, x in enumerate(ids):
        out[order == s] = x
    return out


def slice_order(counts: Any, seed: int, epoch: int, generation: int, part: int) -> np.ndarray:
    """The sources a slice reads, one entry per sample: a uniformly random interleaving of `counts[s]`
    entries of each source s."""
    labels = np.repeat(np.arange(len(counts), dtype=np.int32), np.asarray(counts, dtype=np.int64))
    return _rng(seed, epoch, generation, part, 0x0DE7).permutation(labels)


# --- generations: what is left of an epoch when a run resumes on other ranks or workers -------------


@dataclass(frozen=True)
class Generation:
    """The occurrences of `epoch` still to read when generation `index` began (index 0: all of them).
    `runs` is the sorted id set as (start, length) pairs, compact whatever the epoch's size."""

    epoch: int
    index: int = 0
    runs: np.ndarray | None = None  # int64 [n, 2]; None: every occurrence of the epoch

    def views(self, plan: EpochPlan) -> list[np.ndarray]:
        """Per source, the ids of this generation in sequence order."""
        if self.runs is None:
            return [np.arange(plan.starts[s], plan.starts[s + 1]) for s in range(plan.sources)]
        starts, lengths = self.runs[:, 0], self.runs[:, 1]
        ids = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        return np.split(ids, np.searchsorted(ids, plan.starts[1:-1]))

    def size(self, epoch_occurrences: int) -> int:
        """Occurrences in this generation, of an epoch of `epoch_occurrences`."""
        return epoch_occurrences if self.runs is None else int(self.runs[:, 1].sum())

    def to_state(self) -> dict[str, Any]:
        runs = None if self.runs is None else self.runs.tolist()
        return {"epoch": self.epoch, "index": self.index, "runs": runs}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Generation:
        runs = state["runs"]
        return cls(
            epoch=state["epoch"],
            index=state["index"],
            runs=None if runs is None else np.array(runs, dtype=np.int64).reshape(-1, 2),
        )


def to_runs(ids: np.ndarray) -> np.ndarray:
    """Sorted distinct ids -> [n, 2] (start, length) runs."""
    if len(ids) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = ids[np.concatenate([[0], breaks])]
    lengths = np.diff(np.concatenate([[0], breaks, [len(ids)]]))
    return np.stack([starts, lengths], axis=1).astype(np.int64)


def slice_ids(
    plan: EpochPlan, generation: Generation, seed: int, part: int, parts: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """A slice of a generation: per source the ids it reads, in order, and the order it reads them in
    (one source index per sample)."""
    views = generation.views(plan)
    cuts = split([len(v) for v in views], parts)
    ids = [v[cuts[part, s] : cuts[part + 1, s]] for s, v in enumerate(views)]
    return ids, slice_order([len(x) for x in ids], seed, plan.epoch, generation.index, part)


def remaining(
    plan: EpochPlan, generation: Generation, seed: int, parts: int, states: dict[int, dict[str, Any]]
) -> np.ndarray:
    """The sorted ids of `generation` that its `parts` slices had not yet trained, given each slice's
    reader state {"cursor": samples read, "held": ids read but not yet trained}. A slice without a state
    had read nothing."""
    left = []
    for part in range(parts):
        ids, order = slice_ids(plan, generation, seed, part, parts)
        state = states.get(part)
        if state is None:
            left.extend(ids)
            continue
        read = np.bincount(order[: state["cursor"]], minlength=len(ids))
        left.extend(x[n:] for x, n in zip(ids, read))
        left.append(np.asarray(state["held"], dtype=np.int64))
    out = np.sort(np.concatenate(left)) if left else np.zeros(0, dtype=np.int64)
    if len(out) and (np.diff(out) == 0).any():
        raise ValueError(
            "the data states of the checkpoint hold an occurrence twice; they do not belong to one run"
        )
    return out
