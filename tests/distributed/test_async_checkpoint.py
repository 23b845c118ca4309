"""Asynchronous checkpoints (checkpoint.async_save) on 2 gloo ranks of the real trainer: training goes on
while a checkpoint is written in the background, a kill during that write leaves the previous
checkpoint the newest and the run resumes from it; with async_save off every save blocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def overrides(tiny, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"model.path={tiny('llava')}",
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        "data.workers=0",
        "data.packing.max_tokens=700",
        "optim.lr=1e-3",
        "run.export=false",
        *extra,
    ]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", *args]


def test_a_kill_during_a_background_write_resumes_from_the_previous_checkpoint(
    tiny, overfit_shards: Path, tmp_path: Path
) -> None:
    """Checkpoints every 2 steps; step 4's write hangs in DCP's background thread while the ranks train
    step 5 (and wait for that write at step 6's save). Killing the whole job then (SIGKILL to the launcher
    and both ranks) leaves step-2 the newest checkpoint; the same command resumes from it and finishes."""
    run, flags, log = tmp_path / "run", tmp_path / "flags", tmp_path / "log"
    flags.mkdir()
    args = overrides(tiny, overfit_shards, run, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=2")
    script = str(REPO / "tests" / "distributed" / "slow_save_rank.py")
    wanted = {"writing-rank0", "writing-rank1", "step-5-rank0", "step-5-rank1"}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            torchrun(script, str(flags), "4", *args),
            cwd=REPO,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 300
            while not wanted <= set(os.listdir(flags)) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert wanted <= set(os.listdir(flags)), (sorted(os.listdir(flags)), log.read_text()[-3000:])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".step-4.tmp", "step-2"]

    proc = subprocess.run(
        torchrun("-m", "trainer.train", *args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {run / 'checkpoints' / 'step-2'}" in proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["resumed"] and out["steps"] == 6
    assert f"saved checkpoint {run / 'checkpoints' / 'step-6'} in " in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-6"]


def test_synchronous_saves_with_async_save_off(tiny, overfit_shards: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = overrides(
        tiny,
        overfit_shards,
        run,
        "train.steps=2",
        "checkpoint.every=1",
        "checkpoint.keep=1",
        "checkpoint.async_save=false",
    )
    proc = subprocess.run(
        torchrun("-m", "trainer.train", *args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    assert len({int(p.name[4:-3]) for p in (run / "checkpoints" / "step-2").glob("rank*.pt")}) == 2
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    blocking = [e.value for e in events.Scalars("ckpt/save_blocking_s")]
    total = [e.value for e in events.Scalars("ckpt/save_total_s")]
    assert [e.step for e in events.Scalars("ckpt/save_total_s")] == [1, 2]
    assert all(0 < b <= t for b, t in zip(blocking, total))
