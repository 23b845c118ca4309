"""`python -m trainer.preview`: one record of an input file, rendered, with its trained tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support import REPO

DEMO = REPO / "data_tools" / "demo"


def preview(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "trainer.preview", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_preview_json_and_text(tiny) -> None:
    from transformers import AutoTokenizer

    model = str(tiny("qwen2_vl"))
    proc = preview("--model", model, "--sample", str(DEMO / "minicpm_chat.jsonl"), "--index", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    tok = AutoTokenizer.from_pretrained(model)
    trained = [t for t, label in zip(out["input_ids"], out["labels"]) if label != -100]
    assert (
        tok.decode(trained)
        == "Pink.<|im_end|>Yes, the petals are sharp and the background is blurred.<|im_end|>"
    )
    text = preview(
        "--model", model, "--sample", str(DEMO / "minicpm_chat.jsonl"), "--index", "2", "--color", "never"
    )
    assert "<|image_pad|>x" in text.stdout and "[<|im_end|>]" in text.stdout
    assert f"{len(out['input_ids'])} tokens, {len(trained)} trained" in text.stdout


def test_preview_reports_rejections(tiny) -> None:
    proc = preview("--model", str(tiny("llava")), "--sample", str(DEMO / "llava_images.json"), "--index", "5")
    assert proc.returncode == 1 and "rejected (missing_media)" in proc.stderr
    proc = preview(
        "--model", str(tiny("llava")), "--sample", str(DEMO / "llava_images.json"), "--index", "99"
    )
    assert proc.returncode == 2 and "has no record 99" in proc.stderr
