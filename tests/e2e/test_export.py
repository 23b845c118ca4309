"""The export at the scale it is built for, on a bf16 checkpoint: a full finetune on 2 FSDP2 ranks is
streamed into several safetensors files (each within run.export_shard_gib) under save_pretrained's names
and equals, file for file and bit for bit, what `python -m trainer.export` writes on one process from the
run's checkpoint (model only: no optimizer); both reload with plain transformers in bf16. For LoRA,
`trainer.export` reads only the adapter from the checkpoint and its adapter gives the training logits. One
process under bf16 autocast (the single-GPU path) trains, evaluates and exports in bf16."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support import ENV, REPO
from tests.support.runs import a_pack, command, logits, train


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory: pytest.TempPathFactory):
    from trainer.tiny import build_tiny

    path = build_tiny("llava", tmp_path_factory.mktemp("tiny-llava-bf16"), dtype="bfloat16")
    return lambda family: path


def export_cli(run: Path, out: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.export", str(run), "--out", str(out)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_rank_streamed_export_equals_the_single_process_export(
    tiny_bf16, overfit_shards: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForImageTextToText

    run = tmp_path / "run"
    limit = 0.00005  # GiB: about 54 kB per file
    train(
        command(
            tiny_bf16,
            overfit_shards,
            run,
            "train.steps=2",
            "checkpoint.every=2",
            f"run.export_shard_gib={limit}",
            ranks=2,
        )
    )
    export_cli(run, tmp_path / "single")
    streamed, single = run / "hf", tmp_path / "single"
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert index == json.loads((single / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3
    for name in files:
        a, b = load_file(streamed / name), load_file(single / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert {t.dtype for t in a.values()} == {torch.bfloat16}
        size = sum(t.numel() * t.element_size() for t in a.values())
        assert size <= limit * 2**30 or len(a) == 1, (name, size)
    assert not list(run.glob(".hf.tmp")) and (streamed / "config.json").is_file()
    trained = {k for k in index["weight_map"] if "language_model" in k}
    original = load_file(Path(tiny_bf16("llava")) / "model.safetensors")
    assert index["weight_map"].keys() == original.keys()  # save_pretrained's names
    exported = {k: load_file(streamed / index["weight_map"][k])[k] for k in original}
    assert any(not torch.equal(exported[k], original[k]) for k in trained)  # the 2 steps are in the export
    vision = [k for k in original if "vision_tower" in k]  # frozen: bf16 all along, to the bit
    assert vision and all(torch.equal(exported[k], original[k]) for k in vision)
    model = AutoModelForImageTextToText.from_pretrained(streamed)
    assert model.dtype == torch.bfloat16
    assert torch.equal(
        model.state_dict()[next(iter(model.state_dict()))].cpu(),
        AutoModelForImageTextToText.from_pretrained(single)
        .state_dict()[next(iter(model.state_dict()))]
        .cpu(),
    )


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_export_from_a_checkpoint_reads_only_the_adapter(
    tiny, overfit_shards: Path, tmp_path: Path, method: str
) -> None:
    """`trainer.export` (one process, the adapter read from the checkpoint, no base weights) writes the
    adapter the training run exported, bit for bit; for LoRA it gives the training logits on the base."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from tests.families.oracles import training_model_and_pack

    run = tmp_path / "run"
    train(
        command(tiny, overfit_shards, run, "train.steps=3", "checkpoint.every=3", f"finetune.method={method}")
    )
    export_cli(run, tmp_path / "cli")
    weights = load_file(tmp_path / "cli" / "adapter_model.safetensors")
    assert weights and all("lora_" in k or "multi_modal_projector" in k for k in weights)
    in_training = load_file(run / "hf" / "adapter_model.safetensors")
    assert weights.keys() == in_training.keys() and all(
        torch.equal(weights[k], in_training[k]) for k in weights
    )
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in (tmp_path / "cli", run / "hf")]
    for c in configs:  # peft keeps its targets in a set: any order
        c["target_modules"] = sorted(c["target_modules"])
    assert configs[0] == configs[1]
    if method == "lora":
        trained, _ = training_model_and_pack(run)
        inputs = a_pack(tiny, overfit_shards)
        base = AutoModelForImageTextToText.from_pretrained(tiny("llava")).eval()
        with_adapter = PeftModel.from_pretrained(base, tmp_path / "cli").eval()
        assert torch.allclose(logits(with_adapter, inputs), logits(trained, inputs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_one_process_under_bf16_autocast_trains_and_exports_as_stored(
    tiny_bf16, overfit_shards: Path, tmp_path: Path, method: str
) -> None:
    """The single-GPU path on CPU: no FSDP, train.dtype=bf16 (autocast) with fp32 masters beside bf16
    frozen weights, the chunked loss and eval under the same autocast; the export is bf16."""
    run = tmp_path / "run"
    out = train(
        command(
            tiny_bf16,
            overfit_shards,
            run,
            "train.steps=3",
            "checkpoint.every=0",
            "train.dtype=bf16",
            f"data.eval_shards={overfit_shards}",
            "train.eval_every=3",
            f"finetune.method={method}",
        )
    )
    assert out["steps"] == 3 and 0 < out["final_loss"] < 20 and 0 < out["eval_loss"] < 20
    weights = load_file(
        run / "hf" / ("model.safetensors" if method == "full" else "adapter_model.safetensors")
    )
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
