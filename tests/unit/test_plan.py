"""The mixing plan: exact per-source counts, fresh draws per epoch, up-sampled copies a round apart,
slices that are even, exactly-once, sequential per source and proportional, a random interleaving of the
sources in each slice, and generations that hold exactly what a checkpoint had not trained."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data_tools.manifest import Manifest, ShardEntry, SourceEntry
from data_tools.mixing import mix_report, target_mix
from data_tools.plan import (
    Generation,
    plan_epoch,
    read_order,
    remaining,
    sample_counts,
    slice_ids,
    slice_order,
    split,
    to_runs,
)


def source(name: str, shard_sizes: list[int], epoch_samples: int) -> SourceEntry:
    shards = [
        ShardEntry(path=f"{name}/{name}-{i:06d}.tar", samples=n, bytes=0, sha256="")
        for i, n in enumerate(shard_sizes)
    ]
    return SourceEntry(
        name=name,
        path=f"{name}.json",
        samples=sum(shard_sizes),
        epoch_samples=epoch_samples,
        rejected=0,
        rejected_by_reason={},
        images=0,
        videos=0,
        text_chars=0,
        media_bytes=0,
        fingerprint="",
        shards=shards,
    )


def manifest(*sources: SourceEntry) -> Manifest:
    return Manifest(seed=0, converter="test", sources=list(sources))


MIX = manifest(
    source("down", [40, 0, 17, 43], 30),  # 100 valid, 30 per epoch; an empty shard
    source("up", [3, 4], 18),  # 7 valid, 18 per epoch: 2 each + 4 more
    source("exact", [5], 5),
    source("off", [6], 0),
)


def samples_of(plan, ids) -> list[tuple[int, int]]:
    """(source index, sample ordinal within its source) of each occurrence id."""
    first = {}
    for g, (i, sh) in enumerate(plan.shards):
        first[g] = sum(s.samples for j, s in plan.shards[:g] if j == i)
    return [(plan.shards[int(plan.shard[k])][0], first[int(plan.shard[k])] + int(plan.pos[k])) for k in ids]


@pytest.mark.parametrize("epoch", [0, 1, 7])
def test_counts_are_exact(epoch: int) -> None:
    plan = plan_epoch(MIX, seed=3, epoch=epoch)
    occ = Counter(samples_of(plan, range(len(plan))))
    per_source = Counter()
    for (i, _), n in occ.items():
        per_source[i] += n
    assert dict(per_source) == {0: 30, 1: 18, 2: 5}
    assert len(plan) == 53 and plan.starts.tolist() == [0, 30, 48, 53, 53]
    assert [i for i, _ in samples_of(plan, range(len(plan)))] == [0] * 30 + [1] * 18 + [2] * 5
    # down-sampled: 30 distinct samples once each
    assert sorted(n for (i, _), n in occ.items() if i == 0) == [1] * 30
    # up-sampled: every sample twice, four of them a third time
    assert sorted(n for (i, _), n in occ.items() if i == 1) == [2, 2, 2, 3, 3, 3, 3]
    assert sorted(k for (i, k) in occ if i == 2) == [0, 1, 2, 3, 4]


def test_up_sampled_copies_are_a_round_apart() -> None:
    plan = plan_epoch(MIX, seed=3, epoch=0)
    up = [k for _, k in samples_of(plan, range(plan.starts[1], plan.starts[2]))]
    assert sorted(up[:7]) == sorted(up[7:14]) == list(range(7))  # two whole rounds, then four more
    assert len(set(up[14:])) == 4
    gaps = [j - i for i in range(len(up)) for j in range(i + 1, len(up)) if up[i] == up[j]]
    assert min(gaps) > 1 and np.median(gaps) >= 7  # never adjacent: about a round apart


def test_draws_are_fresh_every_epoch_and_reproducible() -> None:
    picks = [
        frozenset(k for i, k in samples_of(plan_epoch(MIX, 3, e), range(30)) if i == 0) for e in range(4)
    ]
    assert len(set(picks)) == 4
    first, again = plan_epoch(MIX, 3, 2), plan_epoch(MIX, 3, 2)
    assert np.array_equal(again.shard, first.shard) and np.array_equal(again.pos, first.pos)
    other_seed = plan_epoch(MIX, 4, 2)
    assert not np.array_equal(other_seed.pos, first.pos) or not np.array_equal(other_seed.shard, first.shard)
    assert [int(c.sum()) for c in sample_counts(MIX, 3, 0)] == [30, 18, 5, 0]
    orders = {tuple(dict.fromkeys(int(g) for g in plan_epoch(MIX, 0, e).shard)) for e in range(6)}
    assert len(orders) > 1  # shards are visited in fresh orders


@pytest.mark.parametrize(
    "sizes", [[30, 18, 5, 0], [1000, 7, 333, 1], [5, 5, 5], [0, 3], [123457, 98765, 4321]]
)
@pytest.mark.parametrize("parts", [1, 2, 3, 8, 64])
def test_split_is_even_complete_and_proportional(sizes: list[int], parts: int) -> None:
    cuts = split(sizes, parts)
    assert cuts.shape == (parts + 1, len(sizes))
    assert cuts[0].tolist() == [0] * len(sizes) and cuts[-1].tolist() == sizes
    per_slice = np.diff(cuts, axis=0)
    assert (per_slice >= 0).all()  # contiguous, in order, disjoint
    assert per_slice.sum(1).max() - per_slice.sum(1).min() <= 1
    assert np.abs(per_slice - np.asarray(sizes) / parts).max() < 2  # every source in proportion


@pytest.mark.parametrize("ranks, workers", [(1, 1), (2, 2), (3, 1), (4, 3)])
def test_slices_are_exact_once_and_read_each_source_sequentially(ranks: int, workers: int) -> None:
    plan = plan_epoch(MIX, seed=1, epoch=0)
    parts = ranks * workers
    read = []
    for part in range(parts):
        ids, order = slice_ids(plan, Generation(epoch=0), 1, part, parts)
        assert np.bincount(order, minlength=4).tolist() == [len(x) for x in ids]
        for s, x in enumerate(ids):
            if not len(x):
                continue
            assert np.array_equal(x, np.arange(x[0], x[0] + len(x)))  # a stretch of the source's sequence
            assert (plan.source_of(x) == s).all()
            # One forward pass per shard and round (3 at most here): a new pass starts where the shard
            # changes or the position does not go up.
            passes = 1 + ((np.diff(plan.shard[x]) != 0) | (np.diff(plan.pos[x]) <= 0)).sum()
            assert passes <= len(set(plan.shard[x].tolist())) * 3
        read += read_order(ids, order).tolist()
    assert sorted(read) == list(range(len(plan)))


def test_slice_order_is_a_random_interleaving_with_exact_counts() -> None:
    order = slice_order([500, 250, 250], seed=5, epoch=0, generation=0, part=0)
    assert np.bincount(order).tolist() == [500, 250, 250]
    report = mix_report(order, target_mix([500, 250, 250]), 20)
    assert report["median"] <= 1.5 * report["iid_median"] and report["worst"] <= 1.5 * report["iid_worst"]
    # The shard-serial order the plan replaces, one source after another, is far from the mix.
    serial = mix_report(np.sort(order), target_mix([500, 250, 250]), 20)
    assert serial["median"] > 3 * report["iid_median"]
    others = [slice_order([500, 250, 250], 5, *where) for where in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]]
    assert all(not np.array_equal(order, o) for o in others)


def test_to_runs_and_generation_views_round_trip() -> None:
    plan = plan_epoch(MIX, seed=1, epoch=0)
    ids = np.array([0, 1, 2, 7, 29, 30, 31, 50, 52])
    assert to_runs(ids).tolist() == [[0, 3], [7, 1], [29, 3], [50, 1], [52, 1]]
    gen = Generation.from_state(Generation(epoch=0, index=1, runs=to_runs(ids)).to_state())
    assert [v.tolist() for v in gen.views(plan)] == [[0, 1, 2, 7, 29], [30, 31], [50, 52], []]
    assert gen.size(len(plan)) == 9 and Generation(epoch=0).size(len(plan)) == 53


@pytest.mark.parametrize("before, after", [(4, 1), (1, 2), (2, 3), (6, 4)])
def test_a_new_generation_holds_exactly_what_was_not_trained(before: int, after: int) -> None:
    """Slices stopped at random points with samples held in their buffers; the next generation, split
    over another number of slices and read to the end, trains every occurrence exactly once in all."""
    plan = plan_epoch(MIX, seed=2, epoch=0)
    rng = np.random.default_rng(before * 10 + after)
    trained, states = [], {}
    for part in range(before):
        read = read_order(*slice_ids(plan, Generation(epoch=0), 2, part, before))
        cursor = int(rng.integers(0, len(read) + 1))
        held = rng.choice(read[:cursor], size=min(cursor, 3), replace=False).tolist()
        trained += [k for k in read[:cursor].tolist() if k not in held]
        if part or cursor:  # slice 0 with nothing read may have no state at all
            states[part] = {"cursor": cursor, "held": held}
    left = remaining(plan, Generation(epoch=0), 2, before, states)
    assert sorted(trained + left.tolist()) == list(range(len(plan)))
    gen = Generation(epoch=0, index=1, runs=to_runs(left))
    rest = [k for part in range(after) for k in read_order(*slice_ids(plan, gen, 2, part, after)).tolist()]
    assert sorted(trained + rest) == list(range(len(plan)))
    later = read_order(*slice_ids(plan, Generation(epoch=0), 2, 0, 1))[5:7].tolist()  # not yet read
    with pytest.raises(ValueError, match="hold an occurrence twice"):
        remaining(plan, Generation(epoch=0), 2, 1, {0: {"cursor": 2, "held": later}})


def test_more_parts_than_occurrences_and_empty_sources() -> None:
    tiny = manifest(source("a", [2], 3), source("b", [0], 0))
    plan = plan_epoch(tiny, 0, 0)
    assert len(plan) == 3
    sizes = [len(slice_ids(plan, Generation(epoch=0), 0, k, 8)[1]) for k in range(8)]
    assert sorted(sizes) == [0] * 5 + [1] * 3
    with pytest.raises(ValueError, match="b.json has no valid samples but asks for 4"):
        plan_epoch(manifest(source("b", [0], 4)), 0, 0)
    assert len(plan_epoch(manifest(), 0, 0)) == 0
