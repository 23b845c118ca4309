"""Reading planned occurrences from WebDataset shards, sequentially, with counted failures.

A slice of an epoch plan (data_tools.plan.EpochPlan) names, per source, (shard, ordinal) pairs in
shard-major order: each run of ordinals going up in one shard is one pass over that shard, front to
back, stopping after the last sample it is needed for. Shards are opened with webdataset's `gopen`,
so a shard path may also be a `pipe:` or URL spec. A tar that breaks mid-way turns its remaining
planned samples into counted skips (`corrupt_shard`); it never stops the run.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds

from data_tools.plan import EpochPlan

logger = logging.getLogger(__name__)


@dataclass
class RawSample:
    """One occurrence read from its shard: the canonical JSON and media members, still encoded."""

    occurrence: int  # index into the epoch plan
    source: int  # index into manifest.sources
    shard: str  # shard path relative to the shards directory
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # "json", "img0.jpg", ...


@dataclass
class Skip:
    occurrence: int
    source: int
    reason: str  # a counter name, e.g. "corrupt_shard", "bad_image"
    detail: str  # shard and key, for the log


class ShardBroken(Exception):
    def __init__(self, ordinal: int, cause: BaseException) -> None:
        super().__init__(f"broken after sample {ordinal}: {cause}")
        self.ordinal = ordinal


def iter_shard(url: str, wanted: list[int]) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield (ordinal, key, members) for each distinct ordinal in sorted `wanted`, reading the tar
    sequentially and stopping after the last one. Raises ShardBroken on a damaged tar."""
    targets = sorted(set(wanted))
    if not targets:
        return
    ordinal, key, members, i = -1, None, {}, 0
    try:
        with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                k, _, suffix = info.name.partition(".")
                if k != key:
                    if ordinal == targets[i]:
                        yield ordinal, key, members  # type: ignore[misc]
                        i += 1
                        if i == len(targets):
                            return
                    key, members, ordinal = k, {}, ordinal + 1
                if ordinal == targets[i]:
                    members[suffix] = tar.extractfile(info).read()  # type: ignore[union-attr]
            if ordinal == targets[i]:
                yield ordinal, key, members  # type: ignore[misc]
                i += 1
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardBroken(ordinal, e) from e
    if i < len(targets):
        raise ShardBroken(ordinal, EOFError(f"the shard has {ordinal + 1} samples, the manifest more"))


def read_occurrences(
    root: str | Path, plan: EpochPlan, occurrences: Sequence[int]
) -> Iterator[RawSample | Skip]:
    """Read these occurrences (indices into `plan`) and yield each, in the order given, as a RawSample
    or as a Skip saying why it could not be read. Consecutive occurrences of one shard whose ordinals go
    up share a pass over it."""
    k = 0
    while k < len(occurrences):
        g = int(plan.shard[occurrences[k]])
        run = [int(occurrences[k])]
        k += 1
        while (
            k < len(occurrences)
            and int(plan.shard[occurrences[k]]) == g
            and plan.pos[occurrences[k]] > plan.pos[run[-1]]
        ):
            run.append(int(occurrences[k]))
            k += 1
        yield from _read_run(root, plan, g, run)


def read_slice(
    root: str | Path, plan: EpochPlan, ids: list[np.ndarray], order: np.ndarray, start: int = 0
) -> Iterator[RawSample | Skip]:
    """Read a slice of the plan (data_tools.plan.slice_ids) from its entry `start` on: entry k of `order`
    names the source whose next occurrence comes k-th. Each source's ids are read in order by a reader of
    its own, so a slice keeps one shard per source open, each read front to back."""
    done = np.bincount(order[:start], minlength=len(ids))
    readers = [read_occurrences(root, plan, x[n:]) for x, n in zip(ids, done)]
    for s in order[start:]:
        yield next(readers[s])


def _read_run(root: str | Path, plan: EpochPlan, g: int, run: list[int]) -> Iterator[RawSample | Skip]:
    source, shard = plan.shards[g]
    occurrence_at = {int(plan.pos[occ]): occ for occ in run}  # ordinals go up along the run
    done = 0
    try:
        for ordinal, key, members in iter_shard(str(Path(root) / shard.path), list(occurrence_at)):
            yield RawSample(
                occurrence=occurrence_at[ordinal], source=source, shard=shard.path, key=key, members=members
            )
            done += 1
    except ShardBroken as e:
        logger.warning(
            "shard %s: %s; its remaining %d planned samples are skipped", shard.path, e, len(run) - done
        )
        for occ in run[done:]:
            yield Skip(
                occurrence=occ,
                source=source,
                reason="corrupt_shard",
                detail=f"{shard.path} sample {int(plan.pos[occ])}: {e}",
            )
