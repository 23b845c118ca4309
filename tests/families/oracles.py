"""The oracles every model family passes, as one base class: a family's test module subclasses
`FamilyOracles`, states what the real checkpoint does (special tokens, the exact chat format, image
token counts worked out from the real configs, not read back from the tiny builder) and gets

- the tokenizer and chat-template checks (single ids, exact render, prefix consistency, text-only),
- the real-image check (processor + model on two photographs, token counts, assistant mask, loss),
- 2 LoRA steps under FSDP2 on 2 gloo ranks with activation checkpointing, then the exported adapter
  and merged model reloaded with plain transformers / peft give the training model's logits.

Rendering against the processor at inference and packed == per-sample losses run for every
registered family from tests/unit/test_render.py and tests/unit/test_packed_loss.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _data_dir(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} missing: pip install -e .[dev]"
    return Path(spec.submodule_search_locations[0], *parts)


ASTRONAUT = _data_dir("skimage", "data") / "astronaut.png"      # 512 x 512
CHINA = _data_dir("sklearn", "datasets", "images") / "china.jpg"  # 640 wide x 427 high


def conversation(first: dict | None = None, second: dict | None = None) -> list[dict]:
    """A system prompt, two turns, two images: after the text in turn 1, before it in turn 2."""
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image", **(first or {})}]},
        {"role": "assistant", "content": [{"type": "text", "text": "An astronaut."}]},
        {"role": "user", "content": [{"type": "image", **(second or {})}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A palace."}]},
    ]


TEXT_ONLY = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]


class FamilyOracles:
    FAMILY: ClassVar[str]
    SPECIAL_TOKENS: ClassVar[list[str]]                  # each must be one token id, also inside text
    TOKENIZER_ROLES: ClassVar[tuple]                     # (bos, eos, pad, plain tokenization adds bos)
    FULL_RENDER: ClassVar[str]                           # conversation() rendered by the chat template
    GENERATION_PROMPT: ClassVar[str]                     # what add_generation_prompt appends
    ASSISTANT_TEXT: ClassVar[str]                        # the assistant mask of conversation(), decoded
    TEXT_ONLY_RENDER: ClassVar[str]                      # TEXT_ONLY with the generation prompt
    MAX_TOKENS: ClassVar[int] = 4096                     # data.packing.max_tokens for the training oracle

    # --- what a family states about the real model -------------------------------------------------

    def expected_image_tokens(self, image: Image.Image) -> int:
        """Image tokens the real model spends on `image`, worked out from its published config."""
        raise NotImplementedError

    def check_geometry(self, config: Any, processor: Any) -> None:
        """Assert the tiny checkpoint keeps the real model's geometry (sizes, patches, limits)."""
        raise NotImplementedError

    def check_real_images(self, out: Any, processor: Any) -> None:
        """Family-specific checks of the processor output for conversation(astronaut, china)."""

    # --- the oracles -------------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def path(cls, tiny) -> Path:
        return tiny(cls.FAMILY)

    @pytest.fixture(scope="class")
    @classmethod
    def images(cls) -> tuple[Image.Image, Image.Image]:
        return Image.open(ASTRONAUT).convert("RGB"), Image.open(CHINA).convert("RGB")

    @pytest.fixture(autouse=True)
    def _offline(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import huggingface_hub.constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import

    def test_special_tokens_are_single_ids(self, path: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        for token in self.SPECIAL_TOKENS:
            token_id = tok.convert_tokens_to_ids(token)
            assert token_id is not None and (token == tok.unk_token or token_id != tok.unk_token_id), token
            assert tok.encode(token, add_special_tokens=False) == [token_id], token
            ids = tok.encode(f"ab{token}cd", add_special_tokens=False)      # inside text, no spaces
            assert ids.count(token_id) == 1 and len(ids) >= 3, token
            assert tok.decode(ids) == f"ab{token}cd"
        bos, eos, pad, adds_bos = self.TOKENIZER_ROLES
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == (bos, eos, pad)
        ids = tok("hello")["input_ids"]
        assert (ids[0] == tok.bos_token_id) is adds_bos and ids.count(tok.bos_token_id) == int(adds_bos)

    def test_geometry_is_the_real_models(self, path: Path) -> None:
        from transformers import AutoConfig, AutoProcessor

        config = AutoConfig.from_pretrained(path)
        self.check_geometry(config, AutoProcessor.from_pretrained(path))
        text = config.get_text_config()
        assert text.hidden_size <= 64 and text.num_hidden_layers <= 2
        assert (path / "model.safetensors").stat().st_size < 5 * 2**20

    def test_chat_template_format_and_prefixes(self, path: Path) -> None:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        messages = conversation()
        full = proc.apply_chat_template(messages)
        assert full == self.FULL_RENDER
        for k in range(1, len(messages) + 1):
            head = proc.apply_chat_template(messages[:k])
            assert full.startswith(head), k
            if k < len(messages) and messages[k]["role"] == "assistant":
                prompt = proc.apply_chat_template(messages[:k], add_generation_prompt=True)
                assert prompt == head + self.GENERATION_PROMPT
                assert proc.apply_chat_template(messages[: k + 1]).startswith(prompt)
        text_only = proc.apply_chat_template(TEXT_ONLY, add_generation_prompt=True)
        assert text_only == self.TEXT_ONLY_RENDER

    def test_processor_and_model_on_real_images(self, path: Path, images) -> None:
        from transformers import AutoProcessor

        from trainer.models.adapter import get_adapter

        # The family's auto class: not every family is an AutoModelForImageTextToText (Phi-4-multimodal).
        proc, model = AutoProcessor.from_pretrained(path), get_adapter(path).auto_class().from_pretrained(path)
        astronaut, china = images
        out = proc.apply_chat_template(conversation({"image": astronaut}, {"image": china}), tokenize=True,
                                       return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True)
        ids = out["input_ids"][0]
        n_image = int((ids == model.config.image_token_id).sum())
        assert n_image == self.expected_image_tokens(astronaut) + self.expected_image_tokens(china)
        self.check_real_images(out, proc)
        bos = proc.tokenizer.bos_token_id
        if bos is not None and self.TOKENIZER_ROLES[3]:
            assert ids[0] == bos and int((ids == bos).sum()) == 1
        assert proc.tokenizer.decode(ids[out["assistant_masks"][0].bool()]) == self.ASSISTANT_TEXT
        inputs = {k: v for k, v in out.items() if k != "assistant_masks"}
        labels = torch.where(out["assistant_masks"].bool(), out["input_ids"], -100)
        with torch.no_grad():
            loss = model(**inputs, labels=labels).loss
        assert torch.isfinite(loss) and 0 < loss.item() < 20

    @pytest.mark.slow
    def test_lora_on_two_fsdp_ranks_exports_the_training_logits(self, path: Path, overfit_shards: Path,
                                                                 tmp_path: Path) -> None:
        """2 steps of LoRA (vision tower included) on 2 gloo ranks with activation checkpointing, from
        configs/tiny-llava.yaml with only the model swapped; the checkpointed model, the exported adapter
        on the base, and the merged export give the same logits on a real pack."""
        from peft import PeftModel

        from trainer.models.adapter import get_adapter

        run = tmp_path / "run"
        overrides = [f"model.path={path}", f"data.shards={overfit_shards}", f"run.dir={run}",
                     f"data.packing.max_tokens={self.MAX_TOKENS}", "train.steps=2", "checkpoint.every=2",
                     "finetune.method=lora", "finetune.lora.vision=true", "finetune.freeze_vision=false", "finetune.lora.dropout=0.0",
                     "train.activation_checkpointing=full", "run.merge_lora=true", "optim.lr=1e-2"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",  # a free port
               "-m", "trainer.train", "--config", str(REPO / "configs" / "tiny-llava.yaml"), *overrides]
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["steps"] == 2 and out["final_loss"] == out["final_loss"]     # finite, not NaN

        trained, inputs = training_model_and_pack(run)
        expected = logits(trained, inputs)
        auto_class = get_adapter(path).auto_class()
        base = auto_class.from_pretrained(path).eval()
        assert not torch.allclose(logits(base, inputs), expected, atol=1e-4), "training changed nothing"
        with_adapter = PeftModel.from_pretrained(base, run / "hf").eval()
        assert torch.allclose(logits(with_adapter, inputs), expected, atol=1e-5, rtol=1e-5)
        merged = auto_class.from_pretrained(run / "hf" / "merged").eval()
        assert torch.allclose(logits(merged, inputs), expected, atol=1e-4, rtol=1e-4)


    def test_preview_shows_the_trained_answer(self, path: Path, capsys: pytest.CaptureFixture) -> None:
        """`python -m trainer.preview` on the demo's two-image record: the trained tokens are its answer."""
        from transformers import AutoTokenizer

        from trainer.preview import main as preview

        demo = REPO / "data_tools" / "demo" / "llava_images.json"
        assert preview(["--model", str(path), "--sample", str(demo), "--index", "2", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        trained = [t for t, label in zip(out["input_ids"], out["labels"]) if label != -100]
        text = AutoTokenizer.from_pretrained(path).decode(trained)
        assert text.strip().startswith("The first one: a temple with a curved roof. The second shows a flower.")

    def test_qlora_step_trains_lora_on_4bit_weights(self, path: Path, overfit_shards: Path) -> None:
        """The table's QLoRA column: the language model loads in 4-bit, one real pack goes forward and
        backward, and every LoRA weight gets a finite gradient, some of them non-zero."""
        import bitsandbytes as bnb

        from trainer.config import load_config
        from trainer.data.pipeline import build_loader
        from trainer.loop import micro_batch_loss
        from trainer.model import build_model
        from trainer.models.adapter import adapter_for

        cfg = load_config(REPO / "configs" / "tiny-llava.yaml", [
            f"model.path={path}", f"data.shards={overfit_shards}", "finetune.method=qlora",
            f"data.packing.max_tokens={self.MAX_TOKENS}", "finetune.lora.dropout=0.0"])
        adapter = adapter_for(cfg.model)
        assert adapter.qlora
        model = build_model(adapter, cfg, rank=0, world=1).model
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        pack = next(p for p in build_loader(cfg.data, adapter, 0) if not p.dummy)
        micro_batch_loss(model, adapter, pack, torch.device("cpu")).backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits


def training_model_and_pack(run: Path):
    """The run's newest checkpoint loaded into the training model (one process), and its first pack."""
    from trainer import checkpoint
    from trainer.config import load_config
    from trainer.data.pipeline import build_loader
    from trainer.model import build_model
    from trainer.models.adapter import get_adapter
    from trainer.optim import build_optimizer

    cfg = load_config(run / "config.yaml")
    adapter = get_adapter(cfg.model.path)
    built = build_model(adapter, cfg, rank=0, world=1)
    checkpoint.load(checkpoint.latest(run), built.model, build_optimizer(built.model, adapter, cfg.optim, False))
    built.model.eval()
    pack = next(p for p in build_loader(cfg.data, adapter, 0) if not p.dummy)
    return built.model, pack.inputs
