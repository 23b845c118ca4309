"""benchmarks/memory.py's accounting against what real objects allocate: a tiny Qwen2.5-VL on CPU in the
trainer's dtype plan (trained parameters fp32, frozen bf16, QLoRA's base 4-bit), one real AdamW step;
the bytes of its parameters by dtype, gradients and AdamW states equal the prediction for one rank, and
the meta-device build picks the same trained and quantized parameters as the real model."""

from __future__ import annotations

import re
import types

import pytest
import torch

from benchmarks.memory import NF4_BITS, Run, build, state_bytes, working_bytes
from trainer.config import FinetuneConfig, LoraConfig, OptimConfig
from trainer.lora import apply_lora, lora_config
from trainer.model import freeze
from trainer.models.registry import get_adapter
from trainer.optim import build_optimizer


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def real_model(adapter, method: str) -> torch.nn.Module:
    """The tiny checkpoint as the trainer holds it for `method`: trained fp32, frozen bf16 (or 4-bit)."""
    kwargs = {}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs = {
            "device_map": {"": "cpu"},
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
                llm_int8_skip_modules=adapter.quant_skip_modules(),
            ),
        }
    model = adapter.load_model(dtype=torch.bfloat16, attn_implementation="sdpa", **kwargs)
    ft = FinetuneConfig(method=method, lora=LoraConfig(r=8, alpha=16))
    if method != "full":
        model = apply_lora(model, lora_config(adapter, model, ft))
    freeze(model, adapter, types.SimpleNamespace(finetune=ft))
    for p in model.parameters():
        if type(p).__name__ != "Params4bit":
            p.data = p.data.to(torch.float32 if p.requires_grad else torch.bfloat16)
    return model.train()


def meta_build(adapter, method: str) -> tuple:
    return build(adapter, Run(model="tiny", method=method, gpus=1, grad_accum=1, shard_group=1, lora_r=8))


def real_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    out = dict.fromkeys(("params_fp32", "params_bf16", "params_4bit", "gradients", "optimizer"), 0)
    for p in model.parameters():
        if type(p).__name__ == "Params4bit":
            # The packed codes and the double-quantized absmax (the code tables are per tensor, ~1 KiB).
            state = p.quant_state
            out["params_4bit"] += sum(map(tensor_bytes, (p, state.absmax, state.state2.absmax)))
        else:
            out[{torch.float32: "params_fp32", torch.bfloat16: "params_bf16"}[p.dtype]] += tensor_bytes(p)
        if p.grad is not None:
            out["gradients"] += tensor_bytes(p.grad)
    for state in optimizer.state.values() if optimizer else ():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and state["step"].numel() == 1
        out["optimizer"] += tensor_bytes(state["exp_avg"]) + tensor_bytes(state["exp_avg_sq"])
    return out


def one_step(model: torch.nn.Module, adapter) -> torch.optim.Optimizer:
    """Forward and backward on one image and its caption (bf16 compute, as FSDP's policy), one AdamW step."""
    ids, media, _ = adapter.dummy_image
    text = torch.tensor(adapter.tokenizer("A grey square, nothing else.").input_ids)
    ids = torch.cat([ids, text])
    labels = torch.where(torch.arange(len(ids)) < len(ids) - len(text), -100, ids)
    inputs = adapter.model_inputs(ids, labels, adapter.position_ids(ids, media), media)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs, use_cache=False).loss
    loss.backward()
    optimizer = build_optimizer(model, adapter, OptimConfig(), fused=False)
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("method", ["full", "lora"])
def test_predicted_bytes_equal_a_real_step(tiny, method: str) -> None:
    adapter = get_adapter(tiny("qwen2_5_vl"))
    model = real_model(adapter, method)
    optimizer = one_step(model, adapter)
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert all(named[n].grad is not None for n in trainable)  # the image reached the merger
    real = real_bytes(model, optimizer)
    assert state_bytes(model, trainable, set(), shard=1) == real
    assert real["params_fp32"] > 0 and real["params_bf16"] > 0
    # The meta build of the same checkpoint trains the same parameters (names and all).
    meta, meta_trainable, quantized, base, _ = meta_build(adapter, method)
    assert meta_trainable == trainable and not quantized
    assert state_bytes(meta, meta_trainable, set()) == real
    added = ("lora_", "modules_to_save.")  # peft's: not in the checkpoint
    assert base == sum(p.numel() for n, p in named.items() if not any(a in n for a in added))
    # FSDP units by name: the root gathers all outside `layers.N.` / `blocks.N.`, and the biggest block twice.
    units: dict[str, list[str]] = {}
    for n in named:
        found = re.search(r"^(.*\.(layers|blocks)\.\d+)\.", n)
        units.setdefault(found.group(1) if found else "", []).append(n)
    gathered = {u: sum(named[n].numel() for n in ns) for u, ns in units.items()}
    grads = {u: sum(named[n].numel() for n in ns if n in trainable) for u, ns in units.items()}
    blocks = [u for u in units if u]
    assert working_bytes(model, trainable, set(), adapter) == {
        "params": 2 * (gathered[""] + 2 * max(gathered[u] for u in blocks)),
        "gradients": 6 * (grads[""] + max(grads[u] for u in blocks)),
    }
    # Two ranks: every trained tensor's fp32 master, gradient and states split in two (dim 0 padded).
    halves = state_bytes(model, trainable, set(), shard=2)
    padding = 8 * sum(named[n][0].numel() for n in trainable if named[n].dim() > 0)
    assert real["optimizer"] / 2 <= halves["optimizer"] <= real["optimizer"] / 2 + padding


def test_predicted_4bit_bytes_equal_the_quantized_model(tiny) -> None:
    adapter = get_adapter(tiny("qwen2_5_vl"))
    model = real_model(adapter, "qlora")
    quantized = {n for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(quantized) == 7 * adapter.config.text_config.num_hidden_layers  # q k v o gate up down
    predicted = state_bytes(model, trainable, quantized)
    real = real_bytes(model, None)
    assert predicted["params_4bit"] == pytest.approx(real["params_4bit"], rel=0.01)
    assert predicted["params_fp32"] == real["params_fp32"] and predicted["params_bf16"] == real["params_bf16"]
    # The meta build quantizes and trains exactly these parameters.
    _, meta_trainable, meta_quantized, _, _ = meta_build(adapter, "qlora")
    assert (meta_trainable, meta_quantized) == (trainable, quantized)
    # Every rank holds the whole 4-bit base, however many ranks shard the rest.
    assert state_bytes(model, trainable, quantized, shard=4)["params_4bit"] == predicted["params_4bit"]
    assert NF4_BITS == pytest.approx(4.127, abs=1e-3)
