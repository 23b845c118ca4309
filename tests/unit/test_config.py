"""The config's rules across keys: finetune.stage against explicit freeze flags, contradictions between
sections, and `--help-config`, whose docs are the fields' comments."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import PackingConfig, TrainConfig, config_keys, dump_config, field_docs, load_config

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ["model.path=/ckpt/m", "data.shards=/data/shards"]


def load(*overrides: str):
    return load_config(None, [*REQUIRED, *overrides])


@pytest.mark.parametrize(
    "flag, stage, words",
    [
        (
            "finetune.freeze_vision=false",
            2,
            "finetune.freeze_vision=false contradicts finetune.stage=2 (which "
            "freezes the vision tower); drop one of them",
        ),
        (
            "finetune.freeze_llm=false",
            1,
            "finetune.freeze_llm=false contradicts finetune.stage=1 (which freezes the language model)",
        ),
        (
            "finetune.freeze_projector=true",
            1,
            "finetune.freeze_projector=true contradicts finetune.stage=1 (which trains the projector)",
        ),
        (
            "finetune.freeze_llm=true",
            2,
            "finetune.freeze_llm=true contradicts finetune.stage=2 (which trains the language model)",
        ),
    ],
)
def test_a_freeze_flag_contradicting_the_stage_is_an_error_naming_both(
    flag: str, stage: int, words: str
) -> None:
    with pytest.raises(ValueError) as e:
        load(f"finetune.stage={stage}", flag)
    assert words in str(e.value)


def test_a_flag_in_the_yaml_file_counts_as_given_too(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("finetune:\n  freeze_vision: false\n")
    with pytest.raises(ValueError, match=r"finetune.freeze_vision=false contradicts finetune.stage=2"):
        load_config(path, [*REQUIRED, "finetune.stage=2"])


def test_flags_agreeing_with_the_stage_pass_and_unset_flags_take_the_stage_or_the_defaults() -> None:
    ft = load(
        "finetune.stage=1",
        "finetune.freeze_vision=true",
        "finetune.freeze_projector=false",
        "finetune.freeze_llm=true",
    ).finetune
    assert (ft.freeze_vision, ft.freeze_projector, ft.freeze_llm) == (True, False, True)
    ft = load("finetune.stage=2", "finetune.freeze_vision=true").finetune
    assert (ft.freeze_vision, ft.freeze_projector, ft.freeze_llm) == (True, False, False)
    ft = load("finetune.stage=1").finetune
    assert (ft.freeze_vision, ft.freeze_projector, ft.freeze_llm) == (True, False, True)
    ft = load().finetune  # no stage: the defaults
    assert (ft.freeze_vision, ft.freeze_projector, ft.freeze_llm) == (True, False, False)
    ft = load("finetune.freeze_vision=false", "finetune.freeze_llm=true").finetune  # no stage: as given
    assert (ft.freeze_vision, ft.freeze_projector, ft.freeze_llm) == (False, False, True)


def test_the_written_config_of_a_staged_run_loads_back_the_same(tmp_path: Path) -> None:
    """run.dir/config.yaml holds the stage and the flags it resolved (trainer.export reads it back)."""
    cfg = load("finetune.stage=1", "optim.lr=1e-3")
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            ["finetune.lora.vision=true"],
            "finetune.lora.vision=true puts LoRA on the vision tower, but finetune.method=full has no LoRA",
        ),
        (
            ["finetune.method=lora", "finetune.lora.vision=true"],
            "finetune.freeze_vision=true freezes it: set finetune.freeze_vision=false",
        ),
        (
            ["finetune.method=lora", "finetune.stage=2", "finetune.lora.vision=true"],
            "finetune.lora.vision=true contradicts finetune.stage=2 (which freezes the vision tower)",
        ),
        (
            ["finetune.freeze_projector=true", "finetune.freeze_llm=true"],
            "finetune.freeze_* freeze everything",
        ),
        (
            [
                "finetune.method=lora",
                "finetune.freeze_vision=false",
                "finetune.freeze_projector=true",
                "finetune.freeze_llm=true",
            ],
            "leave nothing for finetune.method=lora to train",
        ),
        (["train.eval_every=50"], "train.eval_every=50 evaluates on data.eval_shards, which is not set"),
        (["data.eval_shards=/data/eval"], "data.eval_shards is set, but train.eval_every=0 never evaluates"),
    ],
)
def test_contradicting_keys_are_errors_naming_them(overrides: list[str], words: str) -> None:
    with pytest.raises(ValueError) as e:
        load(*overrides)
    assert words in str(e.value)


def test_the_same_keys_without_the_contradiction_pass() -> None:
    ft = load("finetune.method=lora", "finetune.freeze_vision=false", "finetune.lora.vision=true").finetune
    assert ft.lora.vision and not ft.freeze_vision
    ft = load(
        "finetune.method=qlora",
        "finetune.freeze_vision=false",
        "finetune.lora.vision=true",
        "finetune.freeze_projector=true",
        "finetune.freeze_llm=true",
    ).finetune
    assert ft.freeze_llm and ft.lora.vision
    cfg = load("train.eval_every=50", "data.eval_shards=/data/eval")
    assert cfg.train.eval_every == 50 and cfg.data.eval_shards == "/data/eval"


def test_warmup_as_long_as_the_run_warns_but_loads(caplog: pytest.LogCaptureFixture) -> None:
    """A few-step smoke test of a real config is legitimate, so this is a warning, not an error."""
    with caplog.at_level(logging.WARNING, logger="trainer.config"):
        load("train.steps=100", "optim.warmup_steps=99")
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="trainer.config"):
        cfg = load("train.steps=4", "optim.warmup_steps=4")
    assert cfg.optim.warmup_steps == 4
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["optim.warmup_steps=4 >= train.steps=4"]


def test_every_config_key_has_a_doc() -> None:
    missing = [key for key, _, doc in config_keys() if not doc]
    assert not missing, f"give these fields a comment in trainer/config.py: {missing}"


def test_docs_are_the_comment_on_the_line_or_the_block_above() -> None:
    assert field_docs(PackingConfig)["max_tokens"] == "tokens per packed sequence, media tokens included"
    assert field_docs(TrainConfig)["shard_group"] == (
        "HSDP: shard parameters, gradients and optimizer state within groups of this many ranks (e.g. a "
        "node's 8 GPUs) and replicate across groups; 0 = shard over all ranks (FSDP)."
    )


def test_every_listed_key_and_default_is_a_valid_override_giving_the_defaults() -> None:
    keys = [(key, default) for key, default, _ in config_keys() if key not in ("model.path", "data.shards")]
    assert len(keys) > 50 and ("data.packing.max_tokens", 8192) in keys
    assert load(*(f"{key}={json.dumps(default)}" for key, default in keys)) == load()


def test_help_config_prints_every_key_with_its_default_and_doc_and_exits_0() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--help-config"],
        cwd=REPO,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(config_keys())
    line = next(line for line in lines if line.startswith("data.packing.max_tokens "))
    assert line.split()[:3] == ["data.packing.max_tokens", "=", "8192"]
    assert line.endswith("# tokens per packed sequence, media tokens included")
