"""The loss normalisation and FSDP2 oracles on real gloo ranks (fp32, CPU):
one process with 4 micro-batches == 2 FSDP2 ranks with 2 each (loss and every gradient,
relative 1e-6), and text-only packs on one rank beside image packs on the other never hang."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def run(out: Path, tag: str, schedule: str, overrides: list[str], ranks: int) -> dict:
    script = [str(REPO / "tests" / "dist" / "train_rank.py"), str(out), tag, schedule, *overrides]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                              "--master-port", "29521"] if ranks > 1 else []), *script]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out / f"{tag}.pt")


def overrides(tiny, shards: Path, run_dir: Path) -> list[str]:
    return [f"model.path={tiny('llava')}", f"data.shards={shards}", f"run.dir={run_dir}", "data.workers=0",
            "data.shuffle_buffer=6", "data.packing.buffer=4", "data.packing.max_tokens=1600",
            "finetune.freeze_vision=false", "train.activation_checkpointing=full"]


def test_accumulation_and_fsdp_give_the_same_gradients(tiny, stream_shards: Path, tmp_path: Path) -> None:
    args = overrides(tiny, stream_shards, tmp_path / "run")
    one = run(tmp_path, "one", "0,1,2,3", args, ranks=1)
    two = run(tmp_path, "two", "0,1|2,3", args, ranks=2)
    assert one["targets"] == two["targets"] > 0 and not one["bad"] and not two["bad"]
    assert abs(one["loss"] - two["loss"]) <= 1e-6 * abs(one["loss"])
    assert one["grads"].keys() == two["grads"].keys()
    groups = {k.split(".")[1] for k in one["grads"]}
    assert {"vision_tower", "multi_modal_projector", "language_model"} <= groups
    for name, g in one["grads"].items():
        err = (g - two["grads"][name]).norm() / max(g.norm(), 1e-12)
        assert err <= 1e-6, (name, float(err))


def test_text_only_beside_image_packs_does_not_hang(tiny, stream_shards: Path, tmp_path: Path) -> None:
    out = run(tmp_path, "mixed", "text|image", overrides(tiny, stream_shards, tmp_path / "run"), ranks=2)
    assert not out["bad"] and out["targets"] > 0
    assert any(k.startswith("model.vision_tower") for k in out["grads"])
