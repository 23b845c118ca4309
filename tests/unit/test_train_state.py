"""The training loop's checkpointed state: TrainState and EpochBatches each give a state that a fresh
object takes back whole (through the rank file's torch.save / weights_only load), an EpochBatches
resumed mid-epoch ends the epoch with the counts and progress of an uninterrupted one, a resumed
rank that had run dry never iterates its loader, and a rank file written before TrainState (flat
`state`, `data_exhausted`, ... keys) loads in today's layout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_tools.plan import Generation
from trainer import checkpoint
from trainer.checkpoint import TrainState
from trainer.data.pipeline import EpochBatches, SkipLimitExceeded


def through_a_rank_file(state: dict, tmp_path: Path) -> dict:
    torch.save(state, tmp_path / "rank0.pt")
    return torch.load(tmp_path / "rank0.pt", weights_only=True)


def test_train_state_round_trip(tmp_path: Path) -> None:
    state = TrainState(
        step=17,
        epoch=2,
        total_steps=40,
        samples=523,
        tokens=91_204,
        skipped_steps=3,
        per_source=[300, 0, 223],
    )
    saved = state.state_dict()
    state.per_source[0] += 5  # training goes on after the save: the saved counts stay
    state.step += 1
    assert saved["per_source"] == [300, 0, 223] and saved["step"] == 17

    resumed = TrainState()
    resumed.load_state_dict(through_a_rank_file(saved, tmp_path))
    assert resumed == TrainState(
        step=17,
        epoch=2,
        total_steps=40,
        samples=523,
        tokens=91_204,
        skipped_steps=3,
        per_source=[300, 0, 223],
    )
    assert resumed.state_dict() == saved


def test_train_state_refuses_another_layout() -> None:
    saved = TrainState(step=1, per_source=[1]).state_dict()
    with pytest.raises(ValueError, match="micro_batches_in_epoch"):
        TrainState().load_state_dict({**saved, "micro_batches_in_epoch": 0})
    del saved["total_steps"]
    with pytest.raises(ValueError, match="total_steps"):
        TrainState().load_state_dict(saved)


class Loader:
    """What EpochBatches reads of a StatefulDataLoader: its dataset's sizes, and packs."""

    def __init__(self, packs: list[SimpleNamespace], planned: int) -> None:
        self.packs = packs
        self.dataset = SimpleNamespace(
            rank_occurrences=lambda: planned,
            epoch_occurrences=lambda: planned,
            generation=Generation(epoch=0),
            world=1,
        )

    def __iter__(self) -> Iterator[SimpleNamespace]:
        return iter(self.packs)


def packs() -> list[SimpleNamespace]:
    """Six packs of two samples over two sources; two of them bring a skip count with them."""
    skips = [{}, {"corrupt_sample:1": 1}, {}, {}, {"too_long:0": 2}, {}]
    return [SimpleNamespace(sources=[i % 2, 1], skips=s, empty=False) for i, s in enumerate(skips)]


def test_epoch_batches_resumed_mid_epoch_end_like_an_uninterrupted_epoch(tmp_path: Path) -> None:
    planned = 6 * 2 + 3
    whole = EpochBatches(Loader(packs(), planned), adapter=None, max_skip_fraction=1.0)
    assert len(list(whole)) == 6

    first = EpochBatches(Loader(packs()[:2], planned), adapter=None, max_skip_fraction=1.0)
    it = iter(first)
    next(it), next(it)
    saved = first.state_dict()
    assert saved == {"exhausted": False, "skips": {"corrupt_sample:1": 1}, "consumed": 5}

    # The loader resumes its own position: the rest of the epoch.
    resumed = EpochBatches(Loader(packs()[2:], planned), adapter=None, max_skip_fraction=1.0)
    resumed.load_state_dict(through_a_rank_file(saved, tmp_path))
    assert resumed.state_dict() == saved
    assert len(list(resumed)) == 4
    assert (
        resumed.state_dict()
        == whole.state_dict()
        == {"exhausted": True, "skips": {"corrupt_sample:1": 1, "too_long:0": 2}, "consumed": planned}
    )
    assert resumed.progress == whole.progress == 1.0


def test_a_resumed_rank_that_had_run_dry_does_not_read_again() -> None:
    class Finished(Loader):
        def __iter__(self) -> Iterator[SimpleNamespace]:
            raise AssertionError("the finished loader was iterated again")

    batches = EpochBatches(Finished([], 10), adapter=None, max_skip_fraction=1.0)
    batches.load_state_dict({"exhausted": True, "skips": {}, "consumed": 10})
    assert list(batches) == []


def test_resumed_skips_count_against_the_skip_limit() -> None:
    batches = EpochBatches(Loader(packs(), 10), adapter=None, max_skip_fraction=0.1)  # at most 1 skip
    batches.load_state_dict({"exhausted": False, "skips": {"corrupt_sample:0": 1}, "consumed": 1})
    with pytest.raises(SkipLimitExceeded):
        list(batches)  # the second pack's skip is the epoch's second


def test_a_rank_file_written_before_train_state_loads_in_todays_layout(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    loader_state = {"mmloom_stream": 1, "epoch": 1, "cursor": 7}
    generation = {"epoch": 1, "index": 0, "runs": None}
    legacy = {
        "state": {
            "step": 9,
            "epoch": 1,
            "micro_batches_in_epoch": 0,
            "samples": 36,
            "tokens": 4000,
            "skipped_steps": 1,
            "per_source": [20, 16],
        },
        "data": loader_state,
        "total_steps": 12,
        "data_generation": generation,
        "data_world": 1,
        "data_workers": 0,
        "data_exhausted": True,
        "data_skips": {"render_error:1": 2},
        "data_consumed": 38,
    }
    saver = checkpoint.AsyncSaver(tmp_path, keep=1, background=False)
    saver.save(9, model, optimizer, legacy)
    saver.wait()
    saver.close()

    extra = checkpoint.load(checkpoint.latest(tmp_path), model, optimizer)
    assert extra == checkpoint.rank_extras(tmp_path / "checkpoints" / "step-9")[0]
    state = TrainState()
    state.load_state_dict(extra["train"])
    assert state == TrainState(
        step=9, epoch=1, total_steps=12, samples=36, tokens=4000, skipped_steps=1, per_source=[20, 16]
    )
    assert extra["data"] == {
        "loader": loader_state,
        "generation": generation,
        "world": 1,
        "workers": 0,
        "batches": {"exhausted": True, "skips": {"render_error:1": 2}, "consumed": 38},
    }
    batches = EpochBatches(Loader([], 40), adapter=None, max_skip_fraction=1.0)
    batches.load_state_dict(extra["data"]["batches"])
    assert batches.state_dict() == extra["data"]["batches"]
