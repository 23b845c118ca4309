"""The trust_remote_code path: a checkpoint that ships its own modeling code (here a LLaVA subclass
registered under AutoModelForCausalLM, as InternLM-XComposer2 and Phi-3-Vision do) is refused
without model.trust_remote_code, refused with a missing or stale model.code_revision (the message
gives the pin of the code there now), and trains and exports once pinned."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO
from trainer.models.registry import code_revision, get_adapter

CONFIGURATION = """
from transformers import LlavaConfig


class RemoteLlavaConfig(LlavaConfig):
    model_type = "mmloom_remote_llava"
"""
MODELING = """
from transformers import LlavaForConditionalGeneration

from .configuration_remote import RemoteLlavaConfig


class RemoteLlavaForCausalLM(LlavaForConditionalGeneration):
    config_class = RemoteLlavaConfig
"""


@pytest.fixture(scope="module")
def remote(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("remote") / "ckpt"
    shutil.copytree(tiny("llava"), path)
    (path / "configuration_remote.py").write_text(CONFIGURATION)
    (path / "modeling_remote.py").write_text(MODELING)
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="mmloom_remote_llava",
        architectures=["RemoteLlavaForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_remote.RemoteLlavaConfig",
            "AutoModelForCausalLM": "modeling_remote.RemoteLlavaForCausalLM",
        },
    )
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_remote_code_runs_only_when_trusted_and_pinned(remote: Path) -> None:
    with pytest.raises(ValueError, match="names its own modeling code"):
        get_adapter(remote)
    pin = code_revision(remote)
    with pytest.raises(ValueError, match=f"model.code_revision={pin}"):
        get_adapter(remote, trust_remote_code=True)
    adapter = get_adapter(remote, trust_remote_code=True, revision=pin)
    assert type(adapter.model_from_config()).__name__ == "RemoteLlavaForCausalLM"
    (remote / "modeling_remote.py").write_text(MODELING + "\n# changed after review\n")
    try:
        with pytest.raises(ValueError, match="model.code_revision="):
            get_adapter(remote, trust_remote_code=True, revision=pin)
    finally:
        (remote / "modeling_remote.py").write_text(MODELING)


def test_a_pinned_remote_model_trains_and_exports(remote: Path, overfit_shards: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "trainer.train",
        "--config",
        str(REPO / "configs" / "tiny-llava.yaml"),
        f"model.path={remote}",
        f"data.shards={overfit_shards}",
        f"run.dir={tmp_path / 'run'}",
        "model.trust_remote_code=true",
        f"model.code_revision={code_revision(remote)}",
        "train.steps=3",
        "checkpoint.every=0",
        "data.packing.max_tokens=2048",
    ]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 3
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf", trust_remote_code=True)
    assert type(model).__name__ == "RemoteLlavaForCausalLM"
