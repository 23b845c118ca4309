"""Time from relaunch to the first training step, resuming mid-epoch in a 1M-sample epoch: one JSON line.

    python benchmarks/resume.py [--distinct 50000] [--epoch-samples 1000000] [--workers 2] [--trials 3]

The data: `--distinct` text-only conversations of the LLaVA-like mix (benchmarks/corpus.py),
converted by data_tools/shard.py (10,000 samples per shard) with a data.txt target of
`--epoch-samples`, so the manifest plans 1M occurrences per epoch (each sample drawn about 20
times). The model is a tiny LLaVA-1.5 (trainer/tiny), packs of 8192 tokens, the default
data settings (2 workers, shuffle buffer 1000, packing buffer 64).

A first run of `python -m trainer.train` writes a checkpoint after 2 steps. Its data state is then
moved to the middle of the epoch: every worker's plan cursor goes to the middle of its slice of
the plan, and the occurrences its shuffle buffer and packer hold move along by the same amount —
the state a checkpoint taken half-way through the epoch holds (training 500,000 samples first
would take hours here). The relaunch is the same command; timed from the moment the process is
started until the first optimizer step after the checkpoint has finished, and split into
interpreter start and imports, building the trainer (model, loaders), loading the checkpoint,
and waiting for the first micro-batch (worker start-up, re-reading the held samples and
seeking to the cursor). A fresh start of the same run (no checkpoint) is timed alike for
comparison; trials alternate resume / fresh and every figure is the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHECKPOINT_STEP = 2


def build_data(root: Path, distinct: int, epoch_samples: int) -> tuple[Path, Path]:
    """(shards directory, tiny LLaVA checkpoint)."""
    from benchmarks.corpus import llava_like_records
    from data_tools.shard import main as shard_main
    from trainer.tiny import build_tiny

    root.mkdir(parents=True, exist_ok=True)
    with open(root / "text.jsonl", "w") as f:
        for record in llava_like_records(distinct, [], image_share=0.0):
            f.write(json.dumps(record) + "\n")
    (root / "data.txt").write_text(f"text.jsonl {epoch_samples / 1000}\n")
    shards = root / "shards"
    assert shard_main([str(root / "data.txt"), "--out", str(shards), "--workers", "1", "-q"]) == 0
    return shards, build_tiny("llava", root / "tiny-llava")


def overrides(model: Path, shards: Path, run_dir: Path, workers: int, max_tokens: int) -> list[str]:
    return [
        f"model.path={model}",
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        f"data.workers={workers}",
        f"data.packing.max_tokens={max_tokens}",
        "train.steps=1000",
        f"checkpoint.every={CHECKPOINT_STEP}",
        "run.export=false",
        "train.activation_checkpointing=none",
    ]


def move_to_mid_epoch(checkpoint: Path, shards: Path, seed: int = 0) -> int:
    """Move every worker's position to the middle of its slice; returns the occurrences now consumed."""
    import torch

    from data_tools.manifest import load_manifest
    from data_tools.plan import Generation, plan_epoch, read_order, slice_ids
    from trainer.data.pipeline import plan_seed, stream_states

    manifest = load_manifest(shards)
    plan = plan_epoch(manifest, plan_seed(manifest, seed), 0)
    path = checkpoint / "rank0.pt"
    extra = torch.load(path, weights_only=True)
    states = stream_states(extra["data"]["loader"])
    assert states, "no pipeline state in the checkpoint"
    consumed = 0
    for state in states:
        read = read_order(
            *slice_ids(plan, Generation(epoch=0), plan_seed(manifest, seed), state["part"], state["parts"])
        )
        cursor = len(read) // 2
        assert cursor > state["cursor"], "the checkpoint is already past the middle of the epoch"
        # The last samples read before the new cursor are the ones held in the buffers.
        held = read[cursor - len(state["shuffle"]) - len(state["pool"]) : cursor].tolist()
        state["cursor"] = cursor
        state["shuffle"], state["pool"] = held[: len(state["shuffle"])], held[len(state["shuffle"]) :]
        consumed += cursor - len(held)
    extra["data"]["batches"]["consumed"] = consumed
    torch.save(extra, path)
    return consumed


def launch(args: list[str]) -> dict[str, float]:
    """Run the timed child (this file with --child); its last stdout line is its JSON timings."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "BENCH_T0": repr(time.time()),
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the timed run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(args: list[str]) -> None:
    """`python -m trainer.train ARGS`, reporting when each phase ended and leaving at the first step."""
    t0 = float(os.environ["BENCH_T0"])
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks.setdefault(name, time.time() - t0)

    from trainer import loop

    mark("imports_s")
    init, resume, step = loop.Trainer.__init__, loop.Trainer.resume, loop.Trainer.step

    def timed_init(self: Any, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        mark("trainer_built_s")

    def timed_resume(self: Any) -> bool:
        resumed = resume(self)
        mark("checkpoint_loaded_s")
        marks["resumed"] = float(resumed)
        return resumed

    def timed_step(self: Any, packs: list, wait: float) -> Any:
        mark("first_batch_s")
        step(self, packs, wait)
        mark("first_step_s")
        marks["step"] = self.state.step
        print(json.dumps(marks), flush=True)
        os._exit(0)  # the measurement ends here: no checkpoint, no export

    loop.Trainer.__init__, loop.Trainer.resume, loop.Trainer.step = timed_init, timed_resume, timed_step
    from trainer.train import main as train_main

    train_main(args)
    raise RuntimeError("the run ended without a training step")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--distinct", type=int, default=50_000)
    p.add_argument("--epoch-samples", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--no-fresh", action="store_true", help="skip the fresh-start comparison")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards, model = build_data(root, args.distinct, args.epoch_samples)
        run = root / "run"
        train = [
            "-m",
            "trainer.train",
            *overrides(model, shards, run, args.workers, args.max_tokens),
            f"train.steps={CHECKPOINT_STEP}",
        ]
        proc = subprocess.run(
            [sys.executable, *train],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        checkpoint = run / "checkpoints" / f"step-{CHECKPOINT_STEP}"
        consumed = move_to_mid_epoch(checkpoint, shards)
        runs: dict[str, list[dict[str, float]]] = (
            {"resume": []} if args.no_fresh else {"resume": [], "fresh": []}
        )
        for trial in range(args.trials):
            out = launch(overrides(model, shards, run, args.workers, args.max_tokens))
            assert out["resumed"] and out["step"] == CHECKPOINT_STEP + 1, out
            runs["resume"].append(out)
            if not args.no_fresh:
                out = launch(overrides(model, shards, root / f"fresh{trial}", args.workers, args.max_tokens))
                assert not out["resumed"] and out["step"] == 1, out
                runs["fresh"].append(out)

    result: dict[str, Any] = {
        "benchmark": "resume",
        "epoch_samples": args.epoch_samples,
        "distinct": args.distinct,
        "workers": args.workers,
        "max_tokens": args.max_tokens,
        "trials": args.trials,
        "resumed_at_occurrences": consumed,
    }
    for name, outs in runs.items():
        med = {
            k: statistics.median(o[k] for o in outs)
            for k in ("imports_s", "trainer_built_s", "checkpoint_loaded_s", "first_batch_s", "first_step_s")
        }
        result[f"{name}_to_first_step_s"] = round(med["first_step_s"], 2)
        result[f"{name}_imports_s"] = round(med["imports_s"], 2)
        result[f"{name}_build_s"] = round(med["trainer_built_s"] - med["imports_s"], 2)
        result[f"{name}_load_checkpoint_s"] = round(med["checkpoint_loaded_s"] - med["trainer_built_s"], 2)
        result[f"{name}_first_batch_wait_s"] = round(med["first_batch_s"] - med["checkpoint_loaded_s"], 2)
        result[f"{name}_step_s"] = round(med["first_step_s"] - med["first_batch_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
