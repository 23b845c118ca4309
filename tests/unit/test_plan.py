"""The mixing plan: exact per-source counts, fresh draws per epoch, even exactly-once slices."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data_tools.manifest import Manifest, ShardEntry, SourceEntry, plan_epoch, sample_counts


def source(name: str, shard_sizes: list[int], epoch_samples: int) -> SourceEntry:
    shards = [ShardEntry(path=f"{name}/{name}-{i:06d}.tar", samples=n, bytes=0, sha256="")
              for i, n in enumerate(shard_sizes)]
    return SourceEntry(name=name, path=f"{name}.json", samples=sum(shard_sizes), epoch_samples=epoch_samples,
                       rejected=0, rejected_by_reason={}, images=0, videos=0, text_chars=0, media_bytes=0,
                       fingerprint="", shards=shards)


def manifest(*sources: SourceEntry) -> Manifest:
    return Manifest(seed=0, converter="test", sources=list(sources))


MIX = manifest(
    source("down", [40, 0, 17, 43], 30),        # 100 valid, 30 per epoch; an empty shard
    source("up", [3, 4], 18),                   # 7 valid, 18 per epoch: 2 each + 4 more
    source("exact", [5], 5),
    source("off", [6], 0),
)


def occurrences(plan, m: Manifest) -> Counter:
    """(source index, sample ordinal within source) -> times planned."""
    first = {}
    for g, (i, sh) in enumerate(plan.shards):
        first[g] = sum(s.samples for j, s in plan.shards[:g] if j == i)
    return Counter((plan.shards[g][0], first[g] + int(p)) for g, p in zip(plan.shard, plan.pos))


@pytest.mark.parametrize("epoch", [0, 1, 7])
def test_counts_are_exact(epoch: int) -> None:
    plan = plan_epoch(MIX, seed=3, epoch=epoch)
    occ = occurrences(plan, MIX)
    per_source = Counter()
    for (i, _), n in occ.items():
        per_source[i] += n
    assert dict(per_source) == {0: 30, 1: 18, 2: 5}
    assert len(plan) == 53
    # down-sampled: 30 distinct samples once each
    assert sorted(n for (i, _), n in occ.items() if i == 0) == [1] * 30
    # up-sampled: every sample twice, four of them a third time
    assert sorted(n for (i, _), n in occ.items() if i == 1) == [2, 2, 2, 3, 3, 3, 3]
    assert sorted(k for (i, k) in occ if i == 2) == [0, 1, 2, 3, 4]


def test_draws_are_fresh_every_epoch_and_reproducible() -> None:
    picks = [frozenset(k for (i, k) in occurrences(plan_epoch(MIX, 3, e), MIX) if i == 0) for e in range(4)]
    assert len(set(picks)) == 4
    again = plan_epoch(MIX, 3, 2)
    first = plan_epoch(MIX, 3, 2)
    assert np.array_equal(again.shard, first.shard) and np.array_equal(again.pos, first.pos)
    other_seed = plan_epoch(MIX, 4, 2)
    assert not np.array_equal(other_seed.pos, first.pos) or not np.array_equal(other_seed.shard, first.shard)
    counts0 = sample_counts(MIX, 3, 0)
    assert [int(c.sum()) for c in counts0] == [30, 18, 5, 0]


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_slices_are_even_exact_once_and_sequential(ranks: int, workers: int) -> None:
    plan = plan_epoch(MIX, seed=1, epoch=0)
    parts = ranks * max(1, workers)
    slices = [plan.slice(k, parts) for k in range(parts)]
    sizes = [len(s) for s in slices]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(plan)
    covered = [i for s in slices for i in s]
    assert covered == list(range(len(plan)))               # disjoint, complete, in order
    for s in slices:                                        # each slice reads each shard once, forwards
        shards = [int(plan.shard[i]) for i in s]
        runs = [g for j, g in enumerate(shards) if j == 0 or shards[j - 1] != g]
        assert len(runs) == len(set(runs))
        for g in set(runs):
            pos = [int(plan.pos[i]) for i in s if plan.shard[i] == g]
            assert pos == sorted(pos)


def test_shard_order_is_shuffled_per_epoch() -> None:
    orders = {tuple(dict.fromkeys(int(g) for g in plan_epoch(MIX, 0, e).shard)) for e in range(6)}
    assert len(orders) > 1


def test_more_parts_than_occurrences_and_empty_sources() -> None:
    tiny = manifest(source("a", [2], 3), source("b", [0], 0))
    plan = plan_epoch(tiny, 0, 0)
    assert len(plan) == 3
    assert sorted(len(plan.slice(k, 8)) for k in range(8)) == [0] * 5 + [1] * 3
    with pytest.raises(ValueError, match="b.json has no valid samples but asks for 4"):
        plan_epoch(manifest(source("b", [0], 4)), 0, 0)
    assert len(plan_epoch(manifest(), 0, 0)) == 0
