"""Runs of the real CLIs the e2e tests share: `python -m trainer.train` (alone or under torchrun)
and its --dry-run, with what they print parsed, and the logits of a model on a pack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.support import ENV, REPO


def command(tiny, shards: Path, run_dir: Path, *extra: str, ranks: int = 1) -> list[str]:
    args = [
        "-m",
        "trainer.train",
        f"model.path={tiny('llava')}",
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        "data.workers=0",
        "data.packing.max_tokens=2048",
        "optim.schedule=constant",
        "optim.lr=1e-2",
        "finetune.lora.dropout=0.0",
        *extra,
    ]
    if ranks > 1:
        args = [
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(ranks),
            "--master-port",
            "29523",
            *args,
        ]
    return [sys.executable, *args]


def train(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def logits(model, inputs: dict) -> torch.Tensor:
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def a_pack(tiny, shards: Path):
    from trainer.config import load_config
    from trainer.data.pipeline import build_loader
    from trainer.models.registry import get_adapter

    cfg = load_config(
        None,
        [
            f"model.path={tiny('llava')}",
            f"data.shards={shards}",
            "data.workers=0",
            "data.packing.max_tokens=2048",
        ],
    )
    return next(iter(build_loader(cfg.data, get_adapter(cfg.model.path), 0))).inputs


def dry_run(tiny, shards: Path, *extra: str, ranks: int = 1) -> dict:
    args = [
        "-m",
        "trainer.train",
        "--dry-run",
        f"model.path={tiny('llava')}",
        f"data.shards={shards}",
        "data.shuffle_buffer=8",
        "data.packing.buffer=4",
        "data.packing.max_tokens=2048",
        *extra,
    ]
    if ranks > 1:
        args = [
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(ranks),
            "--master-port",
            "29519",
            *args,
        ]
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
