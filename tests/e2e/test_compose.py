"""Composing a new LMM from parts (trainer/compose.py): a CLIP dual encoder and a Llama causal LM
(tiny, random weights, saved and loaded through from_pretrained) become a LLaVA model with a fresh
projector; stage 1 trains the projector only (vision and LLM unchanged to the bit), stage 2 trains
LoRA on the LLM from the stage-1 export, and the merged export loads with AutoModelForImageTextToText."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support import ENV, REPO
from trainer.tiny.common import (
    CLIP_MEAN,
    CLIP_STD,
    LLAMA3_PATTERN,
    TEXT_WIDTH,
    TokenizerSpec,
    build_tokenizer,
)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """openai/clip-vit-large-patch14-336-like (a CLIPModel: text and vision halves) and a Llama-2-like
    base LM whose tokenizer has no padding token and no chat template."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
            ),
            vision_config=dict(
                image_size=336,
                patch_size=14,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
            ),
            projection_dim=32,
        )
    )
    clip.save_pretrained(root / "clip")
    CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(root / "clip")
    tok = build_tokenizer(
        TokenizerSpec(
            pattern=LLAMA3_PATTERN,
            head=("<unk>", "<s>", "</s>"),
            bos="<s>",
            eos="</s>",
            pad="</s>",
            unk="<unk>",
            add_bos=True,
        )
    )
    tok.pad_token = None
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **TEXT_WIDTH
        )
    )
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return root / "clip", root / "llm"


def train(*overrides: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "trainer.train",
        "--config",
        str(REPO / "configs" / "tiny-llava.yaml"),
        "data.packing.max_tokens=2048",
        "checkpoint.every=0",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_compose_then_stage_1_then_stage_2(parts, overfit_shards: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    clip, llm = parts
    base = tmp_path / "base"
    one = train(
        f"model.path={base}",
        f"model.compose.vision={clip}",
        f"model.compose.llm={llm}",
        f"data.shards={overfit_shards}",
        f"run.dir={tmp_path / 'stage1'}",
        "finetune.stage=1",
        "train.steps=12",
    )
    made = json.loads((base / "composed_from.json").read_text())
    assert made["template"] == "vicuna" and made["added_tokens"] == ["<image>", "<pad>"]
    assert one["steps"] == 12 and one["final_loss"] < 20

    # Stage 1: only the projector moved; the encoder and the language model are the parts' own weights.
    from transformers import CLIPModel, LlamaForCausalLM

    stage1 = AutoModelForImageTextToText.from_pretrained(tmp_path / "stage1" / "hf")
    tower = CLIPModel.from_pretrained(clip).vision_model.state_dict()
    assert tower.keys() == stage1.model.vision_tower.state_dict().keys()
    assert all(torch.equal(v, stage1.model.vision_tower.state_dict()[k]) for k, v in tower.items())
    language = LlamaForCausalLM.from_pretrained(llm)
    trained = {**stage1.model.language_model.state_dict(), "lm_head.weight": stage1.lm_head.weight}
    for k, v in {**language.model.state_dict(), "lm_head.weight": language.lm_head.weight}.items():
        if "embed_tokens" in k or "lm_head" in k:  # grown by two rows (<image>, <pad>) at the mean
            assert torch.equal(trained[k][: v.shape[0]], v) and trained[k].shape[0] == v.shape[0] + 2
        else:
            assert torch.equal(trained[k], v), k
    composed = load_file(base / "model.safetensors")
    exported = load_file(tmp_path / "stage1" / "hf" / "model.safetensors")
    projector = [k for k in exported if "multi_modal_projector" in k]
    assert projector and all(not torch.equal(exported[k], composed[k]) for k in projector)

    # Relaunching stage 1 with the same parts reuses the composed checkpoint; other parts are refused.
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.train",
            "--config",
            str(REPO / "configs" / "tiny-llava.yaml"),
            f"model.path={base}",
            f"model.compose.vision={llm}",
            f"model.compose.llm={llm}",
            f"data.shards={overfit_shards}",
            f"run.dir={tmp_path / 'other'}",
            "--dry-run",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode != 0 and "was composed from" in again.stderr

    # Stage 2: LoRA on the language model from the stage-1 export, merged at the end.
    two = train(
        f"model.path={tmp_path / 'stage1' / 'hf'}",
        f"data.shards={overfit_shards}",
        f"run.dir={tmp_path / 'stage2'}",
        "finetune.stage=2",
        "finetune.method=lora",
        "train.steps=30",
        "run.merge_lora=true",
        "finetune.lora.dropout=0.0",
    )
    assert two["final_loss"] < 0.5
    merged = tmp_path / "stage2" / "hf" / "merged"
    model = AutoModelForImageTextToText.from_pretrained(merged).eval()
    processor = AutoProcessor.from_pretrained(merged)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert (
        processor.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip() == "Four."
    )
