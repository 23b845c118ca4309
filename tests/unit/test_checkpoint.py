"""trainer.checkpoint.AsyncSaver in one process: save() returns while the write is held in DCP's
background thread, the checkpoint holds the weights as they were at save() even though training
changed them since, and `step-<N>` appears only once the write is done, the oldest beyond `keep`
dropped; a failed write raises in the training thread and is never named `step-<N>`."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _FileSystemWriter

from trainer import checkpoint


def model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_save_writes_in_the_background_what_the_weights_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release, writing = threading.Event(), threading.Event()
    real = _FileSystemWriter.write_data

    def held(self, plan, planner):
        writing.set()
        assert release.wait(60)
        return real(self, plan, planner)

    monkeypatch.setattr(_FileSystemWriter, "write_data", held)
    model, optimizer = model_and_optimizer(0)
    saver = checkpoint.AsyncSaver(tmp_path, keep=1)
    saver.save(1, model, optimizer, {"state": {"step": 1}})
    release.set()
    assert saver.wait() == tmp_path / "checkpoints" / "step-1"

    release.clear()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    saver.save(2, model, optimizer, {"state": {"step": 2}})
    assert writing.wait(60)  # save() returned; the write is held in the background
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on meanwhile
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [".step-2.tmp", "step-1"]  # not named step-2 before it is written
    release.set()
    assert saver.wait() == tmp_path / "checkpoints" / "step-2"
    saver.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]  # keep=1

    loaded, fresh_optimizer = model_and_optimizer(1)
    extra = checkpoint.load(checkpoint.latest(tmp_path), loaded, fresh_optimizer)
    assert extra["state"] == {"step": 2}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_a_failed_write_raises_in_the_training_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self, plan, planner):
        raise OSError("disk full")

    monkeypatch.setattr(_FileSystemWriter, "write_data", broken)
    model, optimizer = model_and_optimizer(0)
    saver = checkpoint.AsyncSaver(tmp_path, keep=2)
    saver.save(1, model, optimizer, {})
    with pytest.raises(RuntimeError, match="writing checkpoint .*step-1.tmp failed") as info:
        saver.wait()
    assert "disk full" in repr(info.value.__cause__)
    assert checkpoint.latest(tmp_path) is None
