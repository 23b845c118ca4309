"""The real `python -m trainer.train` (and torchrun) on a tiny llava: full, LoRA and QLoRA overfit a
fixed set with frozen groups untouched to the bit; an export reloads with plain transformers /
peft to the same logits; kill -9 mid-run and relaunching the same command ends bitwise equal to
an uninterrupted run; bad config fails fast, naming the key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support import ENV, REPO
from tests.support.runs import a_pack, command, logits, train


def test_full_finetuning_overfits_and_exports(tiny, overfit_shards: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = train(
        command(
            tiny,
            overfit_shards,
            tmp_path / "run",
            "train.steps=30",
            "checkpoint.every=0",
            f"data.eval_shards={overfit_shards}",
            "train.eval_every=15",
        )
    )
    assert out["steps"] == 30 and out["final_loss"] < 0.05
    assert out["eval_loss"] is not None and out["eval_loss"] < 0.05  # eval on the memorised set
    hf = tmp_path / "run" / "hf"
    exported = load_file(hf / "model.safetensors")
    original = load_file(Path(tiny("llava")) / "model.safetensors")
    vision = [k for k in original if "vision_tower" in k]
    assert vision and all(torch.equal(exported[k], original[k]) for k in vision)  # frozen: to the bit
    projector = next(k for k in original if k.endswith("multi_modal_projector.linear_1.weight"))
    assert not torch.equal(exported[projector], original[projector])
    assert (tmp_path / "run" / "config.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr/llm",
        "train/lr/projector",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/model_tflops_per_s",
        "data/packing_efficiency",
        "eval/loss",
        "train/loss_by_source/overfit",
        "mem/peak_gib",
        "ckpt/save_blocking_s",
        "ckpt/save_total_s",
    } <= tags
    assert "perf/mfu" not in tags  # a CPU has no peak in the table (train.peak_tflops)
    assert all(e.value > 0 for e in events.Scalars("perf/model_tflops_per_s"))
    assert 0.1 < events.Scalars("mem/peak_gib")[-1].value < 16  # peak RSS on CPU: a tiny model
    curve = [e.value for e in events.Scalars("train/loss")]
    assert len(curve) == 30 and curve[-1] < curve[0] / 10
    # The export is a plain transformers checkpoint: it generates the memorised answer.
    model = AutoModelForImageTextToText.from_pretrained(hf).eval()
    processor = AutoProcessor.from_pretrained(hf)
    messages = [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]}]
    prompt = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert (
        processor.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        == "Four."
    )


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_and_qlora_overfit_and_reload(tiny, overfit_shards: Path, tmp_path: Path, method: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    out = train(
        command(
            tiny,
            overfit_shards,
            tmp_path / "run",
            "train.steps=40",
            "checkpoint.every=0",
            f"finetune.method={method}",
            "run.merge_lora=true",
        )
    )
    assert out["final_loss"] < 0.1
    hf = tmp_path / "run" / "hf"
    adapter = load_file(hf / "adapter_model.safetensors")
    assert any("lora_A" in k for k in adapter) and any("multi_modal_projector" in k for k in adapter)
    if method == "lora":
        inputs = a_pack(tiny, overfit_shards)
        base = AutoModelForImageTextToText.from_pretrained(tiny("llava")).eval()
        with_adapter = PeftModel.from_pretrained(base, hf).eval()
        merged = AutoModelForImageTextToText.from_pretrained(hf / "merged").eval()
        a, b = logits(with_adapter, inputs), logits(merged, inputs)
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())


def test_kill_and_relaunch_is_bitwise_equal(tiny, overfit_shards: Path, tmp_path: Path) -> None:
    extra = ["train.steps=8", "checkpoint.every=1", "checkpoint.keep=3", "finetune.freeze_vision=false"]
    train(command(tiny, overfit_shards, tmp_path / "straight", *extra, ranks=2))
    cmd = command(tiny, overfit_shards, tmp_path / "killed", *extra, ranks=2)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    target = tmp_path / "killed" / "checkpoints" / "step-4"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-step
    proc.wait()
    assert target.exists() and not (tmp_path / "killed" / "hf").exists()
    resumed = train(cmd)  # the same command: resumes by itself
    assert resumed["resumed"] and resumed["steps"] == 8
    a = load_file(tmp_path / "straight" / "hf" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_run_reports_its_graphs_and_does_not_recompile(
    tiny, overfit_shards: Path, tmp_path: Path
) -> None:
    """train.compile with full activation checkpointing (inductor on CPU): the final line counts what
    Dynamo compiled; packs of other lengths and make-up (at most 700 tokens: the four samples no
    longer fit one pack) over 4 steps reuse the first step's graphs (without dynamic shapes: 7
    recompiles)."""
    extra = [
        "train.steps=4",
        "checkpoint.every=0",
        "run.export=false",
        "train.activation_checkpointing=full",
        "data.packing.max_tokens=700",
    ]
    out = train(command(tiny, overfit_shards, tmp_path / "run", "train.compile=true", *extra))
    assert out["steps"] == 4 and out["compile"]["graphs"] >= 1 and out["compile"]["recompiles"] == 0, out
    assert set(out["compile"]) == {"graphs", "graph_breaks", "recompiles"}


def test_export_from_a_checkpoint_gives_the_training_logits(
    tiny, overfit_shards: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForImageTextToText

    from trainer import checkpoint
    from trainer.config import load_config
    from trainer.model import build_model
    from trainer.models.registry import get_adapter
    from trainer.optim import build_optimizer

    run = tmp_path / "run"
    train(command(tiny, overfit_shards, run, "train.steps=3", "checkpoint.every=3", "run.export=false"))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.export", str(run)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(run / "config.yaml")
    adapter = get_adapter(cfg.model.path)
    built = build_model(adapter, cfg, rank=0, world=1)
    checkpoint.load(
        checkpoint.latest(run), built.model, build_optimizer(built.model, adapter, cfg.optim, False)
    )
    built.model.eval()
    inputs = a_pack(tiny, overfit_shards)
    expected = logits(built.model, inputs)
    # With the trainer's attention (trainer/attention.py) the export gives the training logits to the bit;
    # plain transformers' SDPA over the masked row sums the same attention in another order.
    same = AutoModelForImageTextToText.from_pretrained(
        run / "hf", attn_implementation=adapter.attn_implementation()
    )
    assert torch.equal(logits(same.eval(), inputs), expected)
    plain = AutoModelForImageTextToText.from_pretrained(run / "hf").eval()
    assert torch.allclose(logits(plain, inputs), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lrr=1", "unknown config key optim.lrr"),
        ("train.grad_accum=0", "train.grad_accum must be >= 1"),
        ("finetune.method=dora", "finetune.method must be one of"),
        ("checkpoint.every=-1", "checkpoint.every must be >= 0"),
        ("train.eval_every=5", "train.eval_every=5 evaluates on data.eval_shards, which is not set"),
    ],
)
def test_bad_config_fails_before_any_heavy_work(tiny, tmp_path: Path, override: str, words: str) -> None:
    start = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.train",
            f"model.path={tiny('llava')}",
            f"data.shards={tmp_path}",
            override,
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and words in proc.stderr
    assert time.time() - start < 30


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_and_qlora_resume_bitwise_with_dropout(
    tiny, overfit_shards: Path, tmp_path: Path, method: str
) -> None:
    import shutil

    extra = [
        "train.steps=6",
        "checkpoint.every=3",
        f"finetune.method={method}",
        "finetune.lora.dropout=0.1",
        "optim.lr=1e-3",
    ]
    train(command(tiny, overfit_shards, tmp_path / "a", *extra))
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("hf", "step-6"))
    resumed = train(command(tiny, overfit_shards, tmp_path / "b", *extra))
    assert resumed["resumed"] and resumed["steps"] == 6
    a = load_file(tmp_path / "a" / "hf" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "hf" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Checkpoints hold what trains, not the frozen base.
    ckpt = sum(f.stat().st_size for f in (tmp_path / "a" / "checkpoints" / "step-6").glob("*.distcp"))
    assert ckpt < (Path(tiny("llava")) / "model.safetensors").stat().st_size


def test_epoch_runs_decay_the_lr_by_data_consumed_to_the_floor(
    tiny, overfit_shards: Path, tmp_path: Path
) -> None:
    """train.epochs without train.steps: the schedule follows the data consumed, so it reaches
    lr * min_lr_ratio exactly at the last step of the last epoch, however many packs an epoch made;
    resuming mid-epoch continues the same schedule to the same weights."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = [
        "train.steps=0",
        "train.epochs=3",
        "optim.schedule=cosine",
        "optim.warmup_steps=1",
        "optim.min_lr_ratio=0.1",
        "data.packing.max_tokens=700",
        "checkpoint.every=3",
        "checkpoint.keep=10",
    ]
    out = train(command(tiny, overfit_shards, tmp_path / "a", *extra))
    assert out["epochs"] == 3 and out["steps"] >= 6
    events = EventAccumulator(str(tmp_path / "a" / "tb"))
    events.Reload()
    lrs = [e.value for e in events.Scalars("train/lr/llm")]
    assert len(lrs) == out["steps"] and lrs[0] == pytest.approx(1e-2)  # one warmup step
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] == pytest.approx(1e-3, rel=1e-6)

    later = [d.name for d in (tmp_path / "a" / "checkpoints").iterdir() if d.name != "step-3"]
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("hf", "tb", *later))
    resumed = train(command(tiny, overfit_shards, tmp_path / "b", *extra))
    assert resumed["resumed"] and resumed["steps"] == out["steps"]
    a = load_file(tmp_path / "a" / "hf" / "model.safetensors")
    b = load_file(tmp_path / "b" / "hf" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_resume_on_one_and_train_the_rest_of_the_epoch_exactly_once(
    tiny, mix_shards: Path, tmp_path: Path
) -> None:
    """2 ranks train 6 steps of an epoch and checkpoint; the run resumes on 1 rank (another world size)
    and finishes the epoch. The training order both wrote (--order-out) holds every sample of the epoch
    exactly once, and the final line counts every source's epoch samples."""
    run, order = tmp_path / "run", tmp_path / "order.jsonl"
    common = ["data.shuffle_buffer=16", "data.packing.buffer=8", "run.export=false", "checkpoint.every=3"]
    first = train(
        [*command(tiny, mix_shards, run, *common, "train.steps=6", ranks=2), "--order-out", str(order)]
    )
    assert first["steps"] == 6 and sum(first["per_source"].values()) < 1200
    proc = subprocess.run(
        [*command(tiny, mix_shards, run, *common, "train.epochs=1"), "--order-out", str(order)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed elastically" in proc.stderr
    assert "2 ranks x 0 data.workers, this run has 1 x 0" in proc.stderr
    rest = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rest["resumed"] and rest["epochs"] == 1 and rest["steps"] > 6
    assert rest["per_source"] == {"long.jsonl": 600, "mid.jsonl": 300, "short.jsonl": 300}
    rows = [json.loads(line) for line in order.read_text().splitlines()]
    for source, n in (("long", 600), ("mid", 300), ("short", 300)):
        assert sorted(r["id"] for r in rows if r["source"] == f"{source}.jsonl") == sorted(
            f"{source}{i}" for i in range(n)
        )
    assert {r["rank"] for r in rows if r["step"] < 6} == {0, 1}
    assert {r["rank"] for r in rows if r["step"] >= 6} == {0}
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)


def test_sigterm_checkpoints_and_exits_for_requeue(tiny, overfit_shards: Path, tmp_path: Path) -> None:
    """A preemption by SIGTERM, sent to torchrun and both ranks (and the data workers) as SLURM does:
    the ranks agree at the next step, checkpoint, leave the requeue marker and exit; relaunching
    resumes from that checkpoint."""
    run, marker, log = tmp_path / "run", tmp_path / "requeue", tmp_path / "log"
    extra = ["train.steps=500", "checkpoint.every=2", "data.workers=1", "run.export=false"]
    env = {**ENV, "MMLOOM_REQUEUE_FILE": str(marker), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            command(tiny, overfit_shards, run, *extra, ranks=2),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        deadline = time.time() + 300
        started = run / "checkpoints" / "step-2"
        while not started.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
    stderr = log.read_text()
    assert "SIGTERM received: checkpointing after this step" in stderr
    step = int(marker.read_text())
    assert 2 <= step < 500 and (run / "checkpoints" / f"step-{step}").is_dir()
    # The final checkpoint's background write finished, and it was named, before the ranks exited.
    assert f"saved checkpoint {run / 'checkpoints' / f'step-{step}'} in " in stderr
    resumed = train(command(tiny, overfit_shards, run, *extra[1:], f"train.steps={step + 2}", ranks=2))
    assert resumed["resumed"] and resumed["steps"] == step + 2 and not resumed["preempted"]
