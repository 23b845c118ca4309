"""The order the real pipeline delivers: every source in its epoch proportion at every moment (windowed
distance from the target mix as close as an i.i.d. order's), on 1 rank and on 2 ranks x 2 workers, and a
checkpoint resumed on other ranks or workers trains the rest of the epoch exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_tools.manifest import load_manifest
from data_tools.mixing import mix_report, target_mix
from data_tools.plan import Generation, plan_epoch
from trainer.config import load_config
from trainer.data.pipeline import build_loader, plan_seed, resume_generation
from trainer.models.registry import get_adapter


def config(tiny, shards: Path, workers: int):
    return load_config(
        None,
        [
            f"model.path={tiny('llava')}",
            f"data.shards={shards}",
            f"data.workers={workers}",
            "data.shuffle_buffer=16",
            "data.packing.buffer=8",
            "data.packing.max_tokens=2048",
        ],
    )


def loader(cfg, rank: int, world: int, epoch: int, generation: Generation | None = None):
    ld = build_loader(cfg.data, get_adapter(cfg.model.path), cfg.train.seed, rank=rank, world=world)
    ld.dataset.set_epoch(epoch)
    if generation is not None:
        ld.dataset.generation = generation
    return ld


def global_order(per_rank: list[list]) -> list[tuple[int, str, int]]:
    """The samples of each rank's packs as the steps take them: micro-batch i of every rank, rank by rank."""
    steps = max(len(p) for p in per_rank)
    return [k for i in range(steps) for packs in per_rank if i < len(packs) for k in packs[i].keys]


@pytest.mark.parametrize(
    "ranks, workers", [(1, 0), pytest.param(2, 2, marks=pytest.mark.slow)]
)  # workers: slow
def test_every_moment_carries_the_mix(tiny, mix_shards: Path, ranks: int, workers: int) -> None:
    cfg = config(tiny, mix_shards, workers)
    order = global_order([list(loader(cfg, r, ranks, epoch=0)) for r in range(ranks)])
    manifest = load_manifest(mix_shards)
    assert sorted(occ for _, _, occ in order) == list(range(1200))  # each occurrence exactly once
    labels = [source for source, _, _ in order]
    assert [labels.count(s) for s in range(3)] == [600, 300, 300]
    report = mix_report(labels, target_mix([s.epoch_samples for s in manifest.sources]), window=12)
    assert report["windows"] == 100
    assert report["median"] <= 1.5 * report["iid_median"], report
    assert report["worst"] <= 1.5 * report["iid_worst"], report
    # The last 1 % of the epoch, at the lowest learning rate, is no longer one source.
    assert len(set(labels[-12:])) > 1


@pytest.mark.parametrize(
    "before, after",
    [((2, 0), (1, 0)), ((1, 0), (2, 0)), pytest.param((1, 2), (1, 1), marks=pytest.mark.slow)],
)
def test_a_checkpoint_resumes_on_other_ranks_or_workers_exactly_once(
    tiny, mix_shards: Path, before: tuple, after: tuple
) -> None:
    """Each old rank trains some packs (its workers hold more in their buffers); the checkpoint's loader
    states give the next generation, which the new ranks read to the end: every occurrence of the epoch
    is trained exactly once over both."""
    (old_ranks, old_workers), (new_ranks, new_workers) = before, after
    cfg_old, cfg_new = config(tiny, mix_shards, old_workers), config(tiny, mix_shards, new_workers)
    trained, states = [], []
    for rank, cut in zip(range(old_ranks), (5, 3)):
        ld = loader(cfg_old, rank, old_ranks, epoch=1)
        it = iter(ld)
        trained += [k for _ in range(cut) for k in next(it).keys]
        states.append(ld.state_dict())
        del it
    manifest = load_manifest(mix_shards)
    seed = plan_seed(manifest, cfg_old.train.seed)
    generation = resume_generation(manifest, seed, Generation(epoch=1), states)
    assert generation.index == 1 and generation.size(1200) == 1200 - len(trained)
    rest = global_order([list(loader(cfg_new, r, new_ranks, 1, generation)) for r in range(new_ranks)])
    occurrences = [occ for _, _, occ in trained + rest]
    assert sorted(occurrences) == list(range(len(plan_epoch(manifest, seed, 1))))
    labels = [source for source, _, _ in trained + rest]
    assert [labels.count(s) for s in range(3)] == [600, 300, 300]
